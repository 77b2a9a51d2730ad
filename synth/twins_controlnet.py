"""Random-weight ControlNet twins, made offline from a twin pipeline's UNet (for controlnet=tile|lineart tests).

`ControlNetModel.from_unet` copies the UNet's encoder, as ControlNet training starts; its "zero convolutions"
start at zero, so such a ControlNet would change nothing. A twin is trained for nothing either way, so its
zero convolutions get small random weights (seeded): the twin's residuals then really move the UNet's output,
and tests can tell a ControlNet run from a plain one. The folder is an ordinary diffusers ControlNet folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synth.twins import build_in_place

ZERO_CONV_STD = 0.05  # residuals of a few percent of the UNet's features: visible, and the sample stays finite


def build_controlnet_twin(unet_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Fill out_dir with a ControlNet made from the UNet in unet_dir, its zero convolutions randomised."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0, ZERO_CONV_STD)
            conv.bias.normal_(0, ZERO_CONV_STD)
    controlnet.save_pretrained(str(out_dir))
    return Path(out_dir)


def ensure_controlnet_twin(unet_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """out_dir holding the ControlNet twin of the UNet in unet_dir, built atomically if it is not there."""
    return build_in_place(out_dir, "config.json", lambda scratch: build_controlnet_twin(unet_dir, scratch, seed))
