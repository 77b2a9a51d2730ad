"""Pipelines made from a loaded one (image-to-image, ControlNet) keep its weights' dtype."""

import torch

from synth import pipelines


def test_image_to_image_shares_weights_in_their_dtype(compose_cfg):
    """diffusers 0.42's from_pipe casts to float32 unless given a dtype; the components are shared, so a bf16 run's
    first refinement stage would have turned the text-to-image weights into fp32 too."""
    cfg = compose_cfg(["model=tiny_sd15", "dtype=bf16", "device=cpu"])
    pipe = pipelines.load_pipeline(cfg.model, torch.device("cpu"), torch.bfloat16)
    img2img = pipelines.for_task(pipe, "sd15", "img2img")
    assert img2img.unet is pipe.unet and img2img.vae is pipe.vae  # shared, not copied
    dtypes = {parameter.dtype for model in (pipe.unet, pipe.vae, pipe.text_encoder) for parameter in model.parameters()}
    assert dtypes == {torch.bfloat16}
