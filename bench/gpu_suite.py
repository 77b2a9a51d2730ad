"""synth's GPU speed against diffusers, in one process: real-size architectures (random weights), eager and accel.

    python bench/gpu_suite.py                          # the default rows on one H100/H200 (meant to fit 8 minutes)
    python bench/gpu_suite.py --only sdxl_1024,train_sd3 --json suite.json   # cases (or row names, globs)
    python bench/gpu_suite.py --all                    # also the extra settings (full compile, int8, FLUX's cache ...)
    python bench/gpu_suite.py --repeats 1              # every row timed once (a quick first look)
    python bench/gpu_suite.py --smoke --json /tmp/s.json   # the same code on the tiny twins on CPU
    python bench/gpu_suite.py --list [--all]           # the rows and their goals, without running anything

Rows. Text-to-image (SDXL 1024² 30 steps, SD3-medium 1024² 28, Kolors and Hunyuan-DiT 1024² 25, FLUX.1 [dev] 1024²
28, SDXL-Turbo 512² 1) under each accel setting of the row (eager = accel=none; compiled = accel.compile=regional
(+ fuse_qkv and channels_last on UNets); fp8 = compiled + accel.quantize=fp8_dynamic); the SDXL high-resolution
chain to 2048² and 4096²; LoRA training steps at 1024² (SD3, Kolors, Hunyuan-DiT, SDXL: cached latents and text
embeddings, gradient checkpointing where diffusers has it).

Each row runs twice, one side after the other on freshly built weights (seed 0, so both sides hold the same
numbers): synth, through its own code path (a composed Hydra config with the accel overrides, synth's accel
functions on the built pipeline as synth.pipelines.get_pipeline applies them, synth.highres.generate), and
diffusers' own pipeline called directly with the same tricks applied by hand (fuse_qkv_projections,
compile_repeated_blocks, set_attention_backend, torchao quantize_, channels_last). The chains' baseline is the same
plan (stages, strengths, steps) through diffusers' own text-to-image and image-to-image pipelines, untiled, with
diffusers' tiled VAE: diffusers has no tiled denoiser, so that ratio compares different work. Training: synth's
add_lora + objective against diffusers' examples' LoRA step (bench/gpu_train.py).

Each side: median seconds of `repeats` runs after one warm-up (CUDA synchronised), and the peak allocated memory
(torch.cuda.max_memory_allocated after reset_peak_memory_stats, weights included). A row whose requirement is missing
on this machine (no CUDA for fp8, compute capability < 8.9, torchao or an attention package not installed, a
setting synth's own accel checks refuse here) prints "skipped: why"; a failing row prints its error and the table
goes on (exit code 1). The wall column is the row's whole time, builds and warm-ups included (the 8-minute budget). Goals (printed beside each row, GB read as GiB: a "24 GB"
card holds 24 GiB) are judged on CUDA only; --smoke checks the script, not the goals.

No weights are downloaded: the models are bench/gpu_models.py's real-size configs with random weights and random
prompt embeddings of the real shapes (no text encoder runs, as after the first image of a run).
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # loading bars would clutter the table
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

GIB = 2**30

# accel settings: the accel.* overrides of a row (conf/accel/none.yaml names the keys)
EAGER: dict = {}
COMPILED = {"compile": "regional"}
COMPILED_UNET = {"compile": "regional", "fuse_qkv": True, "channels_last": True}  # convolutions gain too
FP8_UNET = {**COMPILED_UNET, "quantize": "fp8_dynamic"}
FP8 = {**COMPILED, "quantize": "fp8_dynamic"}


@dataclass
class Case:
    """One model and size; its rows are its accel settings (name -> accel overrides)."""

    name: str
    kind: str  # "image" (one pipeline call), "chain" (synth.highres to `size`), "train" (LoRA steps)
    model: str  # conf/model/<model>.yaml; --smoke uses tiny_<model>
    size: int
    steps: int
    settings: dict[str, dict]
    goals: dict[str, list] = field(default_factory=dict)  # setting (or "*") -> [(metric, limit), ...]
    repeats: int = 3
    extra: dict[str, dict] = field(default_factory=dict)  # more settings, run with --all or named in --only

    def all_settings(self) -> dict[str, dict]:
        return {**self.settings, **self.extra}


# Budget on one H100 (estimates, unmeasured): a build takes seconds; a compiled row's first warm-up compiles the
# repeated blocks once (about 30-60 s), the other side of the row reuses that code (same process, same shapes).
CASES = [
    Case("sdxl_1024", "image", "sdxl", 1024, 30, {"eager": EAGER, "compiled": COMPILED_UNET, "fp8": FP8_UNET},
         {"eager": [("seconds", 2.5)], "compiled": [("seconds", 1.5)]},
         extra={"regional": COMPILED, "full": {"compile": "full", "fuse_qkv": True, "channels_last": True},
                "int8": {**COMPILED_UNET, "quantize": "int8_dynamic"}}),
    Case("sd3_1024", "image", "sd3", 1024, 28, {"eager": EAGER, "compiled": COMPILED},
         {"compiled": [("seconds", 1.3)]}),
    Case("kolors_1024", "image", "kolors", 1024, 25, {"eager": EAGER, "compiled": COMPILED_UNET}, repeats=2),
    Case("hunyuan_dit_1024", "image", "hunyuan_dit", 1024, 25, {"eager": EAGER, "compiled": COMPILED}, repeats=2),
    Case("flux_dev_1024", "image", "flux_dev", 1024, 28, {"eager": EAGER, "compiled": COMPILED, "fp8": FP8},
         repeats=1, extra={"fused": {**COMPILED, "fuse_qkv": True}, "flash": {**COMPILED, "attention": "flash"},
                           "first_block": {**COMPILED, "cache": "first_block"}}),
    Case("sdxl_turbo_512", "image", "sdxl_turbo", 512, 1, {"eager": EAGER, "compiled": COMPILED_UNET},
         {"*": [("seconds", 0.1)]}, repeats=5),
    Case("sdxl_chain_2048", "chain", "sdxl", 2048, 30, {"eager": EAGER, "compiled": COMPILED_UNET},
         {"*": [("seconds", 8.0), ("peak_gib", 24.0)]}, repeats=1),
    Case("sdxl_chain_4096", "chain", "sdxl", 4096, 30, {"eager": EAGER},
         {"*": [("seconds", 30.0), ("peak_gib", 24.0)]}, repeats=1),
    # training: `steps` timed LoRA steps (rank 16) after two warm-up steps; seconds are per step
    Case("train_sd3", "train", "sd3", 1024, 5, {"lora": EAGER}, {"*": [("peak_gib", 8.0)]}),
    Case("train_kolors", "train", "kolors", 1024, 5, {"lora": EAGER}, {"*": [("peak_gib", 8.0)]}),
    Case("train_hunyuan_dit", "train", "hunyuan_dit", 1024, 5, {"lora": EAGER}, {"*": [("peak_gib", 14.0)]}),
    Case("train_sdxl", "train", "sdxl", 1024, 5, {"lora": EAGER}),
]
RATIO_GOAL = 1.02  # synth / diffusers, every row
REPEATED_BLOCKS = {  # diffusers' _repeated_blocks is empty for these two: the block classes a user compiles by hand
    "SD3Transformer2DModel": ("JointTransformerBlock",),
    "HunyuanDiT2DModel": ("HunyuanDiTBlock",),
}


class Skip(Exception):
    """A row's requirement is missing on this machine or in this checkout: the message says which."""


# --- configs and requirements --------------------------------------------------------------------------------


def accel_in_defaults() -> bool:
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(ROOT / "conf" / "infer.yaml").defaults
    return any(hasattr(entry, "keys") and "accel" in entry for entry in defaults)


def compose_row(case: Case, setting: dict, smoke: bool):
    """The infer config synth's side of the row runs: model, size, steps and the accel overrides."""
    from hydra import compose, initialize_config_dir

    model = f"tiny_{case.model}" if smoke else case.model
    overrides = [f"model={model}", f"num_inference_steps={row_steps(case, smoke)}", "seed=0"]
    if setting or accel_in_defaults():
        if not accel_in_defaults():
            raise Skip("synth has no accel config group in this checkout (conf/infer.yaml defaults)")
        overrides += [f"accel.{key}={str(value).lower() if isinstance(value, bool) else value}"
                      for key, value in setting.items()]
        if smoke and setting.get("compile", "none") != "none":
            overrides.append("accel.compile_backend=eager")  # the same graphs and guards, no code generation
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("infer", overrides)
    return cfg


def row_size(case: Case, cfg, smoke: bool) -> int:
    """The row's image side: the case's, scaled to the twin's native size in --smoke (1024 -> 64)."""
    if not smoke:
        return case.size
    real = {"sdxl_turbo": 512}.get(case.model, 1024)
    return case.size * int(cfg.model.native_size) // real


def row_steps(case: Case, smoke: bool) -> int:
    """The row's num_inference_steps: the case's, at most 2 in --smoke (the loop runs; the twins learn nothing)."""
    return min(case.steps, 2) if smoke else case.steps


def check_requirements(setting: dict, device: torch.device) -> None:
    """Skip: what this machine lacks for the setting (checked before any weights are built)."""
    import importlib.util

    quantize = setting.get("quantize", "none")
    if quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise Skip(f"quantize={quantize} needs torchao (not installed)")
    if quantize.startswith("fp8"):
        if device.type != "cuda":
            raise Skip(f"quantize={quantize} needs CUDA (compute capability >= 8.9)")
        if torch.cuda.get_device_capability() < (8, 9):
            raise Skip(f"quantize={quantize} needs compute capability >= 8.9; this GPU has "
                       f"{'.'.join(map(str, torch.cuda.get_device_capability()))}")
    attention = setting.get("attention", "native")
    packages = {"flash": "flash_attn", "_flash_3": "flash_attn_interface", "sage": "sageattention", "xformers": "xformers"}
    if attention in packages and importlib.util.find_spec(packages[attention]) is None:
        raise Skip(f"attention={attention} needs {packages[attention]} (not installed)")
    if attention in packages and device.type != "cuda":
        raise Skip(f"attention={attention} needs CUDA")


# --- synth's side ----------------------------------------------------------------------------------------------


def synth_checks(cfg, device, dtype) -> None:
    """synth's accel checks on this device (synth.infer runs them before any weights load); what they refuse on this
    machine skips the row, with synth's own one-line reason."""
    if cfg.get("accel") is None:
        return
    try:
        from synth.accel import check_accel
        from synth.compile import check_compile
    except ImportError as error:
        raise Skip(f"{error.name} is not in this checkout") from None
    from synth.families import get_family

    try:
        check_accel(cfg, device, dtype)
        check_compile(cfg.accel, device, get_family(cfg.model.family))
    except ValueError as refusal:
        raise Skip(f"synth refuses it on this machine: {refusal}") from None


def synth_accelerate(pipe, cfg) -> None:
    """What synth.pipelines.get_pipeline does to a pipeline it has built: synth.accel.apply_accel, then
    synth.compile.compile_denoiser. accel=none changes nothing."""
    if cfg.get("accel") is None:
        return
    from synth.accel import apply_accel
    from synth.compile import compile_denoiser
    from synth.families import get_family

    family = get_family(cfg.model.family)
    apply_accel(pipe, family, cfg.accel)
    compile_denoiser(pipe, family, cfg.accel)


def synth_runner(case: Case, cfg, smoke: bool, device, dtype):
    """(run, pipe) for synth's side: the model built, accelerated as synth does, and synth.highres.generate."""
    from gpu_models import build_pipeline, prompt_embeddings

    from synth import highres, pipelines
    from synth.families import get_family

    family = get_family(cfg.model.family)
    size = row_size(case, cfg, smoke)
    highres.check_highres(cfg, size, size)
    synth_checks(cfg, device, dtype)
    pipe = build_pipeline(family.name, device, dtype, smoke, f"tiny_{case.model}")
    pipe.scheduler = pipelines.make_scheduler(cfg, pipe.scheduler)  # as get_pipeline: the model's default_scheduler
    synth_accelerate(pipe, cfg)
    call = {**prompt_embeddings(family.name, pipe, device, dtype), "num_inference_steps": row_steps(case, smoke),
            "guidance_scale": float(cfg.model.guidance_scale), **family.call_kwargs(cfg.model, "text2img", size, size)}
    return (lambda: highres.generate(pipe, call, cfg, size, size, seed=0)), pipe


# --- diffusers' side -------------------------------------------------------------------------------------------


def diffusers_accelerate(pipe, denoiser, setting: dict, smoke: bool) -> None:
    """The row's accel setting applied by hand, as a diffusers user would, in synth.accel's order (fused projections
    are quantised too; torch.cat cannot join quantised weights), compilation last."""
    if setting.get("fuse_qkv"):  # the denoiser's and the VAE's (UNet pipelines' fuse_qkv_projections does both)
        denoiser.fuse_qkv_projections()
        if hasattr(pipe.vae, "fuse_qkv_projections"):
            pipe.vae.fuse_qkv_projections()
    quantize = setting.get("quantize", "none")
    if quantize != "none":
        import torchao.quantization as quantization

        configs = {"int8_weight_only": "Int8WeightOnlyConfig", "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
                   "fp8_weight_only": "Float8WeightOnlyConfig", "fp8_dynamic": "Float8DynamicActivationFloat8WeightConfig"}
        quantization.quantize_(denoiser, getattr(quantization, configs[quantize])())
    if setting.get("channels_last"):  # the convolutional models: the VAE, and the denoiser if a UNet
        for module in (pipe.vae, denoiser) if hasattr(pipe, "unet") else (pipe.vae,):
            module.to(memory_format=torch.channels_last)
    if setting.get("attention", "native") != "native":
        denoiser.set_attention_backend(setting["attention"])
    if setting.get("cache", "none") == "first_block":
        from diffusers.hooks import FirstBlockCacheConfig

        denoiser.enable_cache(FirstBlockCacheConfig(threshold=setting.get("cache_threshold", 0.05)))
    if setting.get("vae") == "slicing":
        pipe.vae.enable_slicing()
    compile_mode = setting.get("compile", "none")
    options = {"backend": "eager" if smoke else "inductor", "dynamic": False}  # synth's defaults (conf/accel)
    if compile_mode == "regional":
        if denoiser._repeated_blocks:
            denoiser.compile_repeated_blocks(**options)
        else:  # what compile_repeated_blocks does, for the block classes a user names by hand
            blocks = REPEATED_BLOCKS[type(denoiser).__name__]
            for module in denoiser.modules():
                if type(module).__name__ in blocks:
                    module.compile(**options)
    elif compile_mode == "full":
        denoiser.forward = torch.compile(denoiser.forward, **options)


def diffusers_runner(case: Case, cfg, smoke: bool, device, dtype, setting: dict):
    """(run, pipe) for diffusers' side: the same model, call and settings through diffusers' pipelines directly."""
    from PIL import Image

    from gpu_models import build_pipeline, prompt_embeddings

    from synth import pipelines
    from synth.families import get_family
    from synth.stages import plan_stages

    family = get_family(cfg.model.family)
    size = row_size(case, cfg, smoke)
    pipe = build_pipeline(family.name, device, dtype, smoke, f"tiny_{case.model}")
    pipe.scheduler = pipelines.make_scheduler(cfg, pipe.scheduler)  # the model's own scheduler (Turbo's Euler-a)
    diffusers_accelerate(pipe, getattr(pipe, family.denoiser), setting, smoke)
    call = {**prompt_embeddings(family.name, pipe, device, dtype), "num_inference_steps": row_steps(case, smoke),
            "guidance_scale": float(cfg.model.guidance_scale), **family.call_kwargs(cfg.model, "text2img", size, size)}
    if case.kind == "image":
        return (lambda: pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images[0]), pipe
    # the chain: synth's plan, each stage one untiled diffusers call, the VAE tiled by diffusers
    plan = plan_stages(cfg.highres, family.name, cfg.model.native_size, size, size, row_steps(case, smoke))
    img2img = family.pipeline_class("img2img").from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    shared = {key: value for key, value in call.items() if key not in ("width", "height")}

    def chain():
        generator = torch.Generator("cpu").manual_seed(0)
        base = plan[0]
        image = pipe(**{**shared, "width": base.width, "height": base.height}, generator=generator).images[0]
        for stage in plan[1:]:
            image = image.resize((stage.width, stage.height), Image.LANCZOS)
            image = img2img(**{**shared, "num_inference_steps": stage.steps}, image=image, strength=stage.strength,
                            generator=generator).images[0]
        return image

    return chain, pipe


# --- measuring -------------------------------------------------------------------------------------------------


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_side(run, device, repeats: int, warmups: int) -> dict:
    """Median seconds of `repeats` runs after `warmups`, and the peak allocated over them (gpu_highres.measure_runs)."""
    from gpu_highres import measure_runs

    seconds, peak = measure_runs(run, device, repeats, warmups)
    return {"seconds": statistics.median(seconds), "runs": seconds,
            "peak_gib": peak / GIB if device.type == "cuda" else None}


def image_row(case: Case, setting_name: str, smoke: bool, device, dtype_override, repeats: int | None) -> dict:
    from synth import pipelines

    setting = case.all_settings()[setting_name]
    check_requirements(setting, device)
    cfg = compose_row(case, setting, smoke)
    dtype = pipelines.resolve_dtype(dtype_override, device, cfg.model)
    if setting.get("compile", "none") != "none":
        torch._dynamo.reset()  # each compiled row compiles its own graphs (the other side of the row reuses them)
    repeats = 1 if smoke else repeats or case.repeats
    result = {"dtype": str(dtype).removeprefix("torch."), "size": row_size(case, cfg, smoke)}
    for side, make in (("synth", lambda: synth_runner(case, cfg, smoke, device, dtype)),
                       ("diffusers", lambda: diffusers_runner(case, cfg, smoke, device, dtype, setting))):
        run, pipe = make()
        result[side] = measure_side(run, device, repeats, 0 if smoke else 1)  # smoke: CI's time, no warm-up
        del run, pipe
        free_memory()
    return result


def train_row(case: Case, smoke: bool, device, repeats: int | None) -> dict:
    from gpu_train import diffusers_step_times, step_times

    size = 64 if smoke else case.size
    steps, warmup = (1, 0) if smoke else (repeats or case.steps, 2)
    result = {"dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "size": size, "steps": steps}
    for side, function in (("synth", step_times), ("diffusers", diffusers_step_times)):
        seconds, peak = function(case.model, steps, 16, True, device, smoke, size, warmup)
        result[side] = {"seconds": statistics.median(seconds), "runs": seconds,
                        "peak_gib": peak / GIB if device.type == "cuda" else None}
        free_memory()
    from gpu_models import REAL_SIZE

    if not getattr(__import__("diffusers"), REAL_SIZE[case.model][0])._supports_gradient_checkpointing:
        result["note"] = f"{REAL_SIZE[case.model][0]} has no gradient checkpointing in diffusers: trained without"
    return result


def judge(case: Case, setting_name: str, result: dict, smoke: bool) -> list[dict]:
    """The row's goals with pass/fail (None: not judged, in --smoke or without a figure)."""
    goals = [*case.goals.get("*", []), *case.goals.get(setting_name, [])] + [("ratio", RATIO_GOAL)]
    judged = []
    for metric, limit in goals:
        value = result.get("ratio") if metric == "ratio" else result["synth"].get(metric)
        passed = None if smoke or value is None else bool(value <= limit)
        judged.append({"metric": metric, "limit": limit, "value": value, "pass": passed})
    return judged


def goal_text(goals: list[dict]) -> str:
    units = {"seconds": " s", "peak_gib": " GiB", "ratio": ""}
    names = {"seconds": "", "peak_gib": "peak ", "ratio": "ratio "}
    marks = {True: "pass", False: "FAIL", None: "-"}
    return ", ".join(f"{names[g['metric']]}<= {g['limit']:g}{units[g['metric']]} {marks[g['pass']]}" for g in goals)


def rows(cases: list[Case], extra: bool = False) -> list[tuple[Case, str]]:
    return [(case, setting) for case in cases for setting in (case.all_settings() if extra else case.settings)]


def selected(only: str | None, extra: bool = False) -> list[tuple[Case, str]]:
    """--only: comma-separated case names (their settings; with --all the extra ones too), row names (case/setting,
    extra ones included) or globs of either."""
    if not only:
        return rows(CASES, extra)
    everything = rows(CASES, extra=True)
    patterns = [pattern.strip() for pattern in only.split(",") if pattern.strip()]
    chosen = [(case, setting) for case, setting in everything
              if any(fnmatch.fnmatchcase(f"{case.name}/{setting}", p) or (fnmatch.fnmatchcase(case.name, p) and (
                  extra or setting in case.settings)) for p in patterns)]
    names = {case.name for case in CASES} | {f"{case.name}/{setting}" for case, setting in everything}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise ValueError(f"--only {','.join(unmatched)}: no such row; the rows are "
                         f"{', '.join(f'{c.name}/{s}' for c, s in everything)}")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny twins on CPU: checks the script, not the goals")
    parser.add_argument("--only", help="comma-separated case or row names (globs allowed), e.g. sdxl_1024,train_*")
    parser.add_argument("--json", type=Path, help="also write the table here as JSON")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="auto: each model's CUDA dtype (conf/model), fp32 in --smoke")
    parser.add_argument("--all", action="store_true", help="also the extra settings (full compile, int8, FLUX's "
                        "fused / flash / first_block rows): past the 8-minute budget")
    parser.add_argument("--repeats", type=int, help="timed runs (training: steps) of every row, instead of each row's own")
    parser.add_argument("--list", action="store_true", help="print the rows and their goals, run nothing")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        print(f"--repeats {args.repeats}: must be 1 or more", file=sys.stderr)
        return 2
    try:
        chosen = selected(args.only, args.all)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if args.list:
        for case, setting in chosen:
            goals = judge(case, setting, {"synth": {}}, smoke=True)
            print(f"{case.name + '/' + setting:<28} {case.kind:<6} {case.model} {case.size}px {case.steps} steps "
                  f"accel {case.all_settings()[setting] or 'none'}; goals: {goal_text(goals)}"
                  f"{'  (extra: --all)' if setting in case.extra else ''}")
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu_suite.py needs CUDA (or --smoke, on the tiny twins)", file=sys.stderr)
        return 2
    for name in ("diffusers", "transformers", "synth"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    torch._dynamo.config.recompile_limit = 64  # many shapes per block class across rows; none may fall back to eager

    device = torch.device("cpu" if args.smoke else "cuda")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'smoke'})"
    print(f"{machine}; torch {torch.__version__}, diffusers {__import__('diffusers').__version__}; "
          f"{'smoke: twins, one run each, no warm-up, goals not judged' if args.smoke else 'median of repeats after one warm-up'}")
    header = f"{'row':<28} {'size':>5} {'synth s':>9} {'diffusers s':>11} {'ratio':>6} {'peak GiB':>8} {'wall s':>6}  goals"
    print(header, flush=True)
    results, started = [], time.perf_counter()
    for case, setting in chosen:
        name = f"{case.name}/{setting}"
        entry = {"name": name, "case": case.name, "setting": setting, "kind": case.kind, "model": case.model,
                 "steps": row_steps(case, args.smoke), "accel": case.all_settings()[setting], "skipped": None, "error": None}
        row_start = time.perf_counter()
        try:
            if case.kind == "train":
                entry.update(train_row(case, args.smoke, device, args.repeats))
            else:
                entry.update(image_row(case, setting, args.smoke, device, args.dtype, args.repeats))
            entry["ratio"] = entry["synth"]["seconds"] / entry["diffusers"]["seconds"]
            entry["goals"] = judge(case, setting, entry, args.smoke)
            peak = entry["synth"]["peak_gib"]
            print(f"{name:<28} {entry['size']:>5} {entry['synth']['seconds']:>9.3f} "
                  f"{entry['diffusers']['seconds']:>11.3f} {entry['ratio']:>6.3f} "
                  f"{'-' if peak is None else f'{peak:.2f}':>8} {time.perf_counter() - row_start:>6.0f}  "
                  f"{goal_text(entry['goals'])}"
                  f"{'  (' + entry['note'] + ')' if entry.get('note') else ''}", flush=True)
        except Skip as reason:
            entry["skipped"] = str(reason)
            print(f"{name:<28} skipped: {reason}", flush=True)
        except torch.OutOfMemoryError as error:
            entry["error"] = f"out of memory: {str(error).splitlines()[0]}"
            print(f"{name:<28} OOM", flush=True)
        except Exception as error:  # one failed row must not lose the table: recorded, and the exit code says so
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"{name:<28} failed: {entry['error']}", flush=True)
        free_memory()
        entry["wall_seconds"] = time.perf_counter() - row_start
        results.append(entry)
    total = time.perf_counter() - started
    failed = [entry["name"] for entry in results if entry["error"]]
    missed = [entry["name"] for entry in results if any(g["pass"] is False for g in entry.get("goals", []))]
    print(f"{len(results)} rows in {total:.0f} s (budget on one H100: 480 s); {len(failed)} failed, "
          f"{sum(1 for e in results if e['skipped'])} skipped; goals missed: {', '.join(missed) or 'none'}")
    if args.json:
        payload = {"machine": machine, "smoke": args.smoke, "torch": torch.__version__,
                   "diffusers": __import__("diffusers").__version__, "total_seconds": total, "rows": results}
        args.json.write_text(json.dumps(payload, indent=1, default=lambda value: None if isinstance(value, float)
                                        and not math.isfinite(value) else str(value)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
