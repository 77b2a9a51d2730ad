"""ControlNet during highres refinement (families with a controlnet_img2img pipeline: SD1.x, SDXL): the
`controlnet` group, its checks, loading and conditions.

`controlnet=tile` conditions every image-to-image refinement on the upscaled image itself (ControlNet 1.1 tile:
the model adds detail while the layout stays put); `controlnet=lineart` on line art drawn from the upscaled image
by synth.annotators. The refinement then runs the family's ControlNet image-to-image pipeline, built with
`from_pipe` so that it shares the loaded weights; above one tile synth.tiled_denoiser runs the ControlNet per tile
alongside the UNet. `check_controlnet` needs no torch, so bad input fails before anything loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from synth.families import FAMILIES, get_family

log = logging.getLogger(__name__)

KINDS = ("none", "tile", "lineart")
_cache: dict = {"key": None, "model": None, "annotator_key": None, "annotator": None}


def active(cfg) -> bool:
    control = cfg.get("controlnet")
    return control is not None and control.get("name", "none") != "none"


def model_path(cfg) -> str | None:
    """The ControlNet's folder or hub id: controlnet.path, else the model config's controlnets.<name>."""
    control = cfg.controlnet
    return control.get("path") or (cfg.model.get("controlnets") or {}).get(control.name)


def annotator_path(cfg) -> str | None:
    return cfg.controlnet.get("annotator") or (cfg.model.get("annotators") or {}).get(cfg.controlnet.name)


def check_controlnet(cfg, width: int, height: int) -> None:
    """Refuse a ControlNet setting that cannot run, before any model loads (from synth.checks.check_inputs)."""
    if not active(cfg):
        return
    from synth.config import check_weights_source
    from synth.stages import plan_stages, staged

    control, model = cfg.controlnet, cfg.model
    family = get_family(model.family)
    name = control.name
    where = f"controlnet={name}"
    if name not in KINDS:
        raise ValueError(f"{where}: choose one of {', '.join(KINDS)}")
    if family.controlnet_img2img is None:
        supported = ", ".join(name for name, each in FAMILIES.items() if each.controlnet_img2img)
        raise ValueError(f"{where}: ControlNet refinement is available for {supported}; model family {family.name} has none")
    if not staged(cfg.get("highres")):
        raise ValueError(f"{where} steers the highres chain's refinements, and highres=none turns the chain off; "
                         "use highres=auto")
    steps = cfg.num_inference_steps or model.num_inference_steps
    refines = cfg.get("init_image") is not None or len(
        plan_stages(cfg.highres, family.name, model.native_size, width, height, steps)) > 1
    if not refines:
        raise ValueError(
            f"{where} steers highres refinement, and {width}x{height} at native size {model.native_size} has none: "
            "ask for a size above the native size (with highres=auto), give highres.stages, or an init_image"
        )
    scale = control.get("conditioning_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise ValueError(f"controlnet.conditioning_scale={scale}: must be a number >= 0 (and finite)")
    start, end = control.get("guidance_start", 0.0), control.get("guidance_end", 1.0)
    for key, value in (("guidance_start", start), ("guidance_end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"controlnet.{key}={value}: must be in [0, 1]")
    if start >= end:
        raise ValueError(f"controlnet.guidance_start={start} must be below controlnet.guidance_end={end}")
    paths = [("path", model_path(cfg), "config.json")]
    if name == "lineart":
        paths.append(("annotator", annotator_path(cfg), "sk_model2.pth" if control.get("coarse") else "sk_model.pth"))
        resolution = control.get("detect_resolution", 512)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 64 <= resolution <= 4096:
            raise ValueError(f"controlnet.detect_resolution={resolution}: must be an integer in [64, 4096]")
    for key, path, marker in paths:
        if path is None:
            raise ValueError(
                f"controlnet.{key} is not set and model {family.name} names no "
                f"{'controlnets' if key == 'path' else 'annotators'}.{name}; set controlnet.{key}=<folder or hub id>"
            )
        if model.get("twin"):
            continue  # built on first use next to the model's twin
        check_weights_source(
            f"controlnet.{key}", str(path), marker, folder_error=FileNotFoundError,
            offline_message=f"controlnet.{key}={path}: {marker} is not available offline (HF_HUB_OFFLINE is set); "
                            f"download it first or point controlnet.{key} at a local folder",
        )


def ensure_twins(cfg) -> None:
    """A twin model's ControlNet (and annotator) twins are built from its UNet on first use."""
    if not cfg.model.get("twin"):
        return
    from synth.pipelines import ensure_weights
    from synth.twins_controlnet import ensure_controlnet_twin

    ensure_weights(cfg.model)
    ensure_controlnet_twin(Path(str(cfg.model.path)) / "unet", model_path(cfg), seed=KINDS.index(cfg.controlnet.name))
    if cfg.controlnet.name == "lineart":
        from synth.annotators import ensure_lineart_twin

        ensure_lineart_twin(annotator_path(cfg))


def load_controlnet(cfg, device, dtype):
    """The ControlNetModel for cfg, kept between the jobs of a sweep like the pipeline is."""
    from diffusers import ControlNetModel

    from synth.config import hub_load

    path = str(model_path(cfg))
    offload = cfg.get("offload", "none")
    key = f"{path}|{cfg.controlnet.get('variant')}|{device}|{dtype}|{offload}"
    if _cache["key"] != key:
        _cache["key"], _cache["model"] = None, None
        ensure_twins(cfg)
        kwargs = {"torch_dtype": dtype}
        if cfg.controlnet.get("variant"):
            kwargs["variant"] = cfg.controlnet.variant
        log.info("loading ControlNet %s from %s", cfg.controlnet.name, path)
        model = hub_load(path, "controlnet.path", lambda: ControlNetModel.from_pretrained(path, **kwargs))
        if offload == "model":  # like the pipeline's models: on the CPU, moved to the GPU while it runs
            from accelerate import cpu_offload_with_hook

            model, _ = cpu_offload_with_hook(model, device)
        else:
            model = model.to(device)
        _cache["model"], _cache["key"] = model, key
    return _cache["model"]


def pipeline(pipe, cfg):
    """The family's ControlNet image-to-image pipeline over pipe's components and the configured ControlNet."""
    from synth.pipelines import sharing

    family = get_family(cfg.model.family)
    controlnet = load_controlnet(cfg, pipe._execution_device, pipe.dtype)  # the GPU, also under model offload
    control_pipe = sharing(family.pipeline_class("controlnet_img2img"), pipe, controlnet=controlnet)
    control_pipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return control_pipe


def condition(cfg, image, device):
    """The condition image for one refinement: the upscaled image itself (tile) or its line art (lineart)."""
    if cfg.controlnet.name == "tile":
        return image
    from synth.annotators import LineartAnnotator

    coarse = bool(cfg.controlnet.get("coarse", False))
    key = f"{annotator_path(cfg)}|{coarse}|{device}"
    if _cache["annotator_key"] != key:
        _cache["annotator"] = LineartAnnotator.from_pretrained(str(annotator_path(cfg)), coarse=coarse, device=device)
        _cache["annotator_key"] = key
    return _cache["annotator"](image, detect_resolution=int(cfg.controlnet.get("detect_resolution", 512)))


def call_kwargs(cfg) -> dict:
    control = cfg.controlnet
    return {
        "controlnet_conditioning_scale": float(control.get("conditioning_scale", 1.0)),
        "control_guidance_start": float(control.get("guidance_start", 0.0)),
        "control_guidance_end": float(control.get("guidance_end", 1.0)),
    }
