"""What differs between model families: pipeline classes, size rules, and family-specific arguments.

A new family is one entry here plus one config file in conf/model/. Class names are strings so that
importing this module (for input checks) does not import diffusers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    text2img: str  # "module:Class" of the text-to-image pipeline
    img2img: str  # "module:Class" of the image-to-image pipeline
    size_step: int  # width and height must be multiples of this: VAE factor 8 x the DiT patch size
    single_file: bool  # whether diffusers can load a civitai-style single-file checkpoint
    kind: str  # "unet" or "dit"
    controlnet_img2img: str | None = None  # "module:Class" of image-to-image with a ControlNet (highres refinement)

    def pipeline_class(self, task: str):
        """The diffusers pipeline class for task "text2img", "img2img" or "controlnet_img2img"."""
        module, name = getattr(self, task).split(":")
        return getattr(importlib.import_module(module), name)

    def load_kwargs(self, model_cfg) -> dict:
        """Extra from_pretrained arguments the family needs."""
        return {}

    def call_kwargs(self, model_cfg, task: str, width: int, height: int) -> dict:
        """Extra pipeline-call arguments the family needs (height/width for text-to-image)."""
        return {"width": width, "height": height} if task == "text2img" else {}

    def img2img_steps(self, steps: int, strength: float) -> int:
        """How many denoising steps image-to-image runs: diffusers' UNet pipelines run floor(steps * strength)."""
        return min(int(steps * strength), steps)


class SD3(Family):
    def load_kwargs(self, model_cfg) -> dict:
        # Dropping T5 saves ~9 GB; the pipeline then pads the T5 slot with zeros, as in sd3_medium_incl_clips.
        return {} if model_cfg.get("t5", True) else {"text_encoder_3": None, "tokenizer_3": None}

    def call_kwargs(self, model_cfg, task, width, height) -> dict:
        # The SD3 img2img pipeline defaults its size to the transformer's sample size, not the image's.
        return {"width": width, "height": height, "max_sequence_length": model_cfg.get("max_sequence_length", 256)}

    def img2img_steps(self, steps: int, strength: float) -> int:
        # StableDiffusion3Img2ImgPipeline skips int(steps - steps * strength) steps, so it rounds up.
        return steps - int(max(steps - steps * strength, 0))


class HunyuanDiT(Family):
    def call_kwargs(self, model_cfg, task, width, height) -> dict:
        # Resolution binning silently replaces the requested size with the nearest trained bucket.
        return {"width": width, "height": height, "use_resolution_binning": False}


FAMILIES: dict[str, Family] = {
    "sd15": Family(
        "sd15",
        "diffusers:StableDiffusionPipeline",
        "diffusers:StableDiffusionImg2ImgPipeline",
        size_step=8,
        single_file=True,
        kind="unet",
        controlnet_img2img="diffusers:StableDiffusionControlNetImg2ImgPipeline",
    ),
    "sdxl": Family(
        "sdxl",
        "diffusers:StableDiffusionXLPipeline",
        "diffusers:StableDiffusionXLImg2ImgPipeline",
        size_step=8,
        single_file=True,
        kind="unet",
        controlnet_img2img="diffusers:StableDiffusionXLControlNetImg2ImgPipeline",
    ),
    "sd3": SD3(
        "sd3",
        "diffusers:StableDiffusion3Pipeline",
        "diffusers:StableDiffusion3Img2ImgPipeline",
        size_step=16,
        single_file=True,
        kind="dit",
    ),
    "kolors": Family(
        "kolors",
        "diffusers:KolorsPipeline",
        "diffusers:KolorsImg2ImgPipeline",
        size_step=8,
        single_file=False,
        kind="unet",
    ),
    "hunyuan_dit": HunyuanDiT(
        "hunyuan_dit",
        "diffusers:HunyuanDiTPipeline",
        "synth.hunyuan_img2img:HunyuanDiTImg2ImgPipeline",  # diffusers has none
        size_step=16,
        single_file=False,
        kind="dit",
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]
