"""GPU timings of the high-resolution chain: an SDXL-shaped model (or FLUX.1 [dev]'s, --family flux) at real size
with random weights, fp16 (FLUX: bf16) on CUDA.

    python bench/gpu_highres.py                      # 1024 text-to-image, untiled 2048 (baseline), 2048 and 4096 chains
    python bench/gpu_highres.py --steps 20 --repeats 1 --sizes 2048
    python bench/gpu_highres.py --smoke              # the same code on the tiny SDXL twin on CPU (64 -> 256 px), seconds
    python bench/gpu_highres.py --controlnet --offload   # also the 2048 chain with ControlNet tile, and with offload=model
    python bench/gpu_highres.py --family flux --steps 28 [--smoke]   # FLUX.1 [dev]'s transformer and VAE (12B, bf16)

Each row: median seconds of `--repeats` runs after one warm-up (CUDA synchronised), and peak allocated memory.
Goals on one H100: 2048 chain <= 8 s, 4096 chain <= 30 s, peak <= 24 GB. No weights are downloaded: the UNet and
VAE are built from SDXL-base's configs with random weights, and the prompt is given as random embeddings of
SDXL's shapes (so no text encoder runs, as after the first image of a run). The VAE runs in fp16 without
diffusers' fp32 upcast (as with an fp16-fixed SDXL VAE). --family flux builds FLUX.1 [dev]'s transformer and VAE from
their configs in bf16 (the transformer alone is 24 GB) with T5-sized random prompt embeddings; its tiles run one per
transformer call (see synth.families.flux.tiled_forward), so the ControlNet and offload rows are SDXL's only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
from omegaconf import OmegaConf

from gpu_models import FLUX_TRANSFORMER, FLUX_VAE, SDXL_UNET, SDXL_VAE  # noqa: E402,F401  (the real-size configs)
from gpu_models import build_pipeline as build_family_pipeline  # noqa: E402
from gpu_models import prompt_embeddings  # noqa: E402


def build_flux_pipeline(device, dtype, smoke: bool):
    return build_family_pipeline("flux", device, dtype, smoke)


def build_pipeline(device, dtype, smoke: bool):
    return build_family_pipeline("sdxl", device, dtype, smoke)


def prompt_call(pipe, device, dtype, steps: int, smoke: bool) -> dict:
    """Random prompt embeddings of the model's shapes (gpu_models.prompt_embeddings), steps and guidance."""
    flux = getattr(pipe, "transformer", None) is not None
    call = prompt_embeddings("flux" if flux else "sdxl", pipe, device, dtype)
    return {**call, "num_inference_steps": steps, "guidance_scale": 3.5 if flux else 5.0}


def chain_config(native: int, size: int, staged: bool, controlnet_path: str | None = None, offload: str = "none",
                 family: str = "sdxl"):
    highres = OmegaConf.load(ROOT / "conf" / "highres" / ("auto.yaml" if staged else "none.yaml"))
    control = OmegaConf.load(ROOT / "conf" / "controlnet" / ("tile.yaml" if controlnet_path else "none.yaml"))
    if controlnet_path:
        control.path = controlnet_path
    return OmegaConf.create({
        "model": {"family": family, "native_size": native}, "highres": highres, "controlnet": control,
        "offload": offload, "init_image": None, "denoise_strength": 0.75, "size": size,
    })


def controlnet_folder(pipe, scratch: Path) -> str:
    """A ControlNet of the benchmark UNet's shape (SDXL-sized: ~1.25 B parameters), saved where from_pretrained reads it."""
    from synth.twins_controlnet import build_controlnet_twin

    unet_dir = scratch / "unet"
    pipe.unet.save_pretrained(unet_dir)
    return str(build_controlnet_twin(unet_dir, scratch / "controlnet-tile"))


def measure_runs(run, device, repeats: int, warmups: int = 1) -> tuple[list[float], int]:
    """Seconds of each of `repeats` synchronised runs after `warmups` warm-ups, and the CUDA allocator's peak over
    the timed runs (bytes, weights included; 0 on the CPU)."""
    for _ in range(warmups):
        run()
    seconds = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def measure(run, device, repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` synchronised runs after one warm-up, and the peak memory (GB) over them."""
    seconds, peak = measure_runs(run, device, repeats)
    return statistics.median(seconds), peak / 1e9 if device.type == "cuda" else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="num_inference_steps (SDXL's default: 30)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="chain sizes (x native/1024 in --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny SDXL twin on CPU: checks the script, not the goals")
    parser.add_argument("--controlnet", action="store_true", help="also the 2048 chain with controlnet=tile")
    parser.add_argument("--offload", action="store_true", help="also the 2048 chain with offload=model (runs last)")
    parser.add_argument("--family", choices=("sdxl", "flux"), default="sdxl", help="the model's shape")
    args = parser.parse_args()
    flux = args.family == "flux"
    if flux and (args.controlnet or args.offload):
        parser.error("--controlnet and --offload are rows of the SDXL model only")

    from synth import highres

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16 if flux else torch.float16
    native = 64 if args.smoke else 1024
    pipe = (build_flux_pipeline if flux else build_pipeline)(device, dtype, args.smoke)
    call = prompt_call(pipe, device, dtype, args.steps, args.smoke)

    def run_at(size: int, staged: bool, **options):
        cfg = chain_config(native, size, staged, family=args.family, **options)
        call_at = {**call, "width": size, "height": size}
        return lambda: highres.generate(pipe, call_at, cfg, size, size, seed=0)

    scale = native / 1024
    rows = [("text-to-image", native, run_at(native, True))]
    if 2048 in args.sizes:
        rows.append(("untiled (baseline)", int(2048 * scale), run_at(int(2048 * scale), False)))
    rows += [("chain", int(size * scale), run_at(int(size * scale), True)) for size in args.sizes]
    scratch = Path(tempfile.mkdtemp(prefix="gpu-highres-"))
    if args.controlnet:
        path = controlnet_folder(pipe, scratch)
        rows.append(("chain + ControlNet", int(2048 * scale), run_at(int(2048 * scale), True, controlnet_path=path)))
    if args.offload:
        def offloaded():
            if getattr(pipe.unet, "_hf_hook", None) is None:
                pipe.enable_model_cpu_offload(device=device)
            return run_at(int(2048 * scale), True, offload="model")()

        rows.append(("chain, offload=model", int(2048 * scale), offloaded))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    print(f"{name}, {args.family}, {str(dtype).removeprefix('torch.')}, {args.steps} steps, median of {args.repeats} after a warm-up")
    print(f"{'run':<22} {'size':>6} {'seconds':>8} {'peak GB':>8}")
    for label, size, run in rows:
        try:
            seconds, peak = measure(run, device, args.repeats)
            print(f"{label:<22} {size:>6} {seconds:>8.2f} {peak:>8.2f}", flush=True)
        except torch.OutOfMemoryError:
            print(f"{label:<22} {size:>6} {'OOM':>8}", flush=True)
            torch.cuda.empty_cache()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
