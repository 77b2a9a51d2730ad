"""The input checks of an infer config, run before torch or any weights load: `check_inputs`.

This module sits on top of the checks it gathers (config, highres, controlnet, prompter, loras), so none of
them imports it back.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from synth.accel import check_accel_inputs
from synth.config import (
    DEVICES,
    DTYPES,
    OFFLOADS,
    check_finite,
    check_init_image,
    check_model_path,
    check_offline,
    check_size,
    fitting_schedulers,
    parse_size,
    scheduler_families,
    scheduler_fits,
)
from synth.controlnet import check_controlnet
from synth.families import get_family
from synth.highres import check_highres
from synth.loras import check_lora_inputs
from synth.prompter import check_prompt_inputs


def check_inputs(cfg: DictConfig) -> tuple[int, int]:
    """Validate an infer config before anything heavy runs; returns (width, height)."""
    check_finite(cfg)  # first: a nan fails every comparison below, so `nan < 0` would let it through
    model = cfg.model
    family = get_family(model.family)
    scheduler = cfg.scheduler
    if not scheduler_fits(scheduler, family):
        raise ValueError(
            f"scheduler={scheduler.name} does not fit {family.name} "
            f"(it suits {', '.join(scheduler_families(scheduler))}); for {family.name} use one of: "
            + ", ".join(fitting_schedulers(family.name))
        )
    if cfg.device not in DEVICES:
        raise ValueError(f"device={cfg.device}: choose one of {', '.join(DEVICES)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype}: choose one of {', '.join(DTYPES)}")
    offload = cfg.get("offload", "none")
    if offload not in OFFLOADS:
        raise ValueError(f"offload={offload}: choose one of {', '.join(OFFLOADS)}")
    if offload != "none" and cfg.device in ("cpu", "mps"):
        raise ValueError(f"offload={offload} moves weights between the CPU and a CUDA GPU; device={cfg.device} has none "
                         "(use offload=none)")
    steps = cfg.num_inference_steps if cfg.num_inference_steps is not None else model.num_inference_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"num_inference_steps={steps}: must be an integer >= 1")
    if not isinstance(cfg.num_images, int) or cfg.num_images < 1:
        raise ValueError(f"num_images={cfg.num_images}: must be an integer >= 1")
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else model.guidance_scale
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < math.inf:
        raise ValueError(f"guidance_scale={guidance}: must be a finite number >= 0")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed={cfg.seed}: must be an integer in [0, 2**63)")
    width, height = parse_size(cfg.size, model.native_size)
    check_size(width, height, family.name)
    if cfg.init_image is not None:
        image_size = check_init_image(str(cfg.init_image))
        if cfg.size is None:  # image-to-image keeps the init image's size unless size= asks for another
            width, height = image_size
            if width % family.size_step or height % family.size_step:
                raise ValueError(
                    f"init_image={cfg.init_image}: its size {width}x{height} is not a multiple of "
                    f"{family.size_step} ({family.name}); pass size=WxH to resize it"
                )
        strength = cfg.denoise_strength
        if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"denoise_strength={strength}: must be in (0, 1]")
        if family.img2img_steps(steps, strength) < 1:
            raise ValueError(
                f"denoise_strength={strength} with num_inference_steps={steps} runs no step "
                "(image-to-image runs about steps * strength steps); raise either"
            )
    family.check_model(cfg)  # the family's own model.* settings
    check_highres(cfg, width, height)  # highres group: tiles, stages, strengths
    check_controlnet(cfg, width, height)  # controlnet group: family, paths, scales
    check_model_path(model)
    check_offline(model)
    check_lora_inputs(cfg.get("lora"), family.name)
    check_prompt_inputs(cfg)  # prompter group and textual_inversion
    check_accel_inputs(cfg)  # accel group: values and what the family supports (the device's part: synth.accel.check_accel)
    return width, height
