"""Text-to-image and image-to-image from a composed config: `infer(cfg)` is what `python infer.py` runs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from synth.checks import check_inputs

log = logging.getLogger(__name__)


def infer(cfg: DictConfig) -> list[Path]:
    """Generate cfg.num_images images and write them as PNGs with provenance; returns their paths."""
    # 1. Check inputs: every user error surfaces here, before torch or any weights load.
    width, height = check_inputs(cfg)
    model = cfg.model
    steps = cfg.num_inference_steps if cfg.num_inference_steps is not None else model.num_inference_steps
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else model.guidance_scale
    task = "img2img" if cfg.init_image is not None else "text2img"

    import torch
    from PIL import Image

    from synth import highres, pipelines
    from synth.a1111 import a1111_parameters, resources
    from synth.families import get_family
    from synth.images import CONFIG_KEY, PARAMETERS_KEY, open_image_as_viewed, save_png

    family = get_family(model.family)

    # 2. Build the pipeline, or reuse the one this process built for the same model, device and dtype; the accel
    # options are checked against the device first (kernels, torchao, compute capability), before weights load.
    from synth.accel import check_accel, reset_cache

    device = pipelines.resolve_device(cfg.device)
    dtype = pipelines.resolve_dtype(cfg.dtype, device, model)
    check_accel(cfg, device, dtype)
    pipe = pipelines.for_task(pipelines.get_pipeline(cfg, device, dtype), family.name, task)
    pipe.set_progress_bar_config(desc=f"{family.name} {task}", leave=False)
    found = resources(cfg)  # the model's, LoRAs' and embeddings' names and hashes for the PNGs (hashing is cached)

    # 3. Prepare the call: the prompter's prompt (translated, refined) encoded once for the run (CLIP families:
    # embeddings, long prompts in 77-token chunks); image-to-image takes the init image at the requested size.
    from synth.prompt_encoding import prompt_kwargs
    from synth.prompter import process_prompt, record_prompt

    prompt = process_prompt(str(cfg.prompt), cfg.prompter, cfg.seed, device, dtype)
    call = {
        **prompt_kwargs(pipe, family, prompt, str(cfg.negative_prompt or ""), float(guidance), model),
        "num_inference_steps": steps,
        "guidance_scale": float(guidance),
        **family.call_kwargs(model, task, width, height),
    }
    if task == "img2img":
        init_image = open_image_as_viewed(str(cfg.init_image), "init_image")  # EXIF-rotated, 16-bit scaled
        if init_image.size != (width, height):  # size= was given: the user asked for the resize
            init_image = init_image.resize((width, height), Image.LANCZOS)
        call.update(image=init_image, strength=float(cfg.denoise_strength))

    # 4. Generate each image from its own seed (a CPU generator gives the same noise on every device).
    out_dir = Path(cfg.output_dir)
    written = []
    for index in range(cfg.num_images):
        seed = cfg.seed + index
        image_cfg = cfg.copy()
        with open_dict(image_cfg):
            image_cfg.seed, image_cfg.num_images = seed, 1
        record_prompt(image_cfg, str(cfg.prompt), prompt)  # replay uses the processed prompt, prompter off
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        reset_cache(getattr(pipe, family.denoiser))  # accel.cache: no state left by a cancelled earlier call
        # Above the native size: staged upscale + refine on tiles (synth/highres.py); else one pipeline call.
        image, stats = highres.generate(pipe, call, cfg, width, height, seed, out_dir, f"{index:03d}-seed{seed}")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        log.info("image %d/%d (seed %d) in %.2f s%s", index + 1, cfg.num_images, seed, time.perf_counter() - start,
                 f", peak CUDA memory {peak:.2f} GiB" if peak is not None else "")

        # 5. Write the PNG with its prompt and settings in A1111's words (the scheduler and stages that ran, the
        # resources' hashes) and the config that regenerates exactly this image.
        text = {
            PARAMETERS_KEY: a1111_parameters(image_cfg, width, height, steps, guidance, pipe.scheduler, found,
                                             stats.get("plan")),
            CONFIG_KEY: OmegaConf.to_yaml(image_cfg, resolve=True),
        }
        if peak is not None:
            text["synth-peak-cuda-memory"] = f"{peak:.3f} GiB"
        path = save_png(image, out_dir, f"{index:03d}-seed{seed}", text)
        print(path, flush=True)
        written.append(path)

    # 6. logger=wandb: the run's images and settings as a table (a multirun logs once, from its contact sheet).
    from synth.wandb_log import log_table, wants_wandb

    if wants_wandb(cfg) and not in_multirun():
        rows = [[[path], str(cfg.prompt), cfg.seed + index, f"{width}x{height}", steps, guidance, cfg.scheduler.name]
                for index, path in enumerate(written)]
        log_table(cfg, out_dir, ["prompt", "seed", "size", "steps", "guidance_scale", "scheduler"], rows)
    return written


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
