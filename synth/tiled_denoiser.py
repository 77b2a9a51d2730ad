"""Run a pipeline's denoiser (UNet or DiT) on overlapping latent tiles, blended per step (MultiDiffusion).

`tiled_denoiser(pipe, settings, forward=...)` swaps the denoiser's forward for the duration of a pipeline call: the
pipeline keeps its own loop, classifier-free guidance and scheduler step on the whole latent, and each
denoiser call becomes batches of tiles (tiles x CFG batch), blended by synth.tiling. What each family needs
per tile is its family's tiled forward (Family.tiled_forward): the UNet one is here, the DiTs' live in their
family modules (synth/families/sd3.py, hunyuan_dit.py).

- UNets (SD1.x, SDXL, Kolors): crops; SDXL/Kolors size conditioning says "a tile_h x tile_w crop at
  (top, left) of the full original image", consistent with the untiled call. A ControlNet is deferred: its
  call on the whole latent becomes a `DeferredControl`, and the tiled UNet runs it per tile on the same crop
  of the latent and the matching crop of the condition image, so neither the ControlNet nor its residuals
  ever run at full size.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from synth.tiling import Tile, tile_layout, tiled_apply


@dataclass(frozen=True)
class TileSettings:
    """Tiling of one denoiser, all in latent pixels."""

    tile_size: int
    tile_overlap: int
    tile_batch_size: int  # tiles per denoiser call (each tile carries the whole CFG batch)
    align: int = 1  # tile starts and sizes are multiples of this (a DiT's patch size)
    vae_scale_factor: int = 8  # latent -> pixel, for SDXL/Kolors/Hunyuan size conditioning
    pad_last_batch: bool = False  # a compiled denoiser: every call takes tile_batch_size tiles (synth.tiling.tiled_apply)


def denoiser_of(pipe):
    """The pipeline's denoiser module: `unet` for UNet families, `transformer` for DiTs."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


@dataclass
class DeferredControl:
    """A ControlNet call on the whole latent, held back so that the tiled UNet runs it tile by tile."""

    forward: object  # the ControlNet's own forward
    sample: torch.Tensor
    timestep: object
    encoder_hidden_states: torch.Tensor
    controlnet_cond: torch.Tensor  # the condition image, (batch, 3, height * 8, width * 8)
    kwargs: dict  # conditioning_scale, added_cond_kwargs, ...

    def run(self, chunk: list[Tile], time_ids: torch.Tensor | None):
        """(down residuals, mid residual) of the ControlNet on these tiles, stacked tile-major like the UNet's crops."""
        batch = self.sample.shape[0]
        scale = self.controlnet_cond.shape[-1] // self.sample.shape[-1]  # pixels per latent pixel
        sample = torch.cat([self.sample[(..., *tile.slices())] for tile in chunk])
        cond = torch.cat([
            self.controlnet_cond[..., tile.top * scale:(tile.top + tile.height) * scale,
                                 tile.left * scale:(tile.left + tile.width) * scale]
            for tile in chunk
        ])
        kwargs = repeat_batch(self.kwargs, batch, len(chunk))
        if time_ids is not None:
            kwargs["added_cond_kwargs"] = {**kwargs["added_cond_kwargs"], "time_ids": time_ids}
        return self.forward(sample, repeat_batch(self.timestep, batch, len(chunk)),
                            repeat_batch(self.encoder_hidden_states, batch, len(chunk)), cond, **kwargs, return_dict=False)


def defer_controlnet(original, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                     guess_mode=False, return_dict=True, **kwargs):
    """Stand-in for ControlNetModel.forward inside `tiled_denoiser`: returns the call itself, not residuals."""
    if guess_mode:
        raise ValueError("tiled denoising runs ControlNets per tile and does not take guess_mode; use guess_mode=false")
    if controlnet_cond.shape[-1] % sample.shape[-1] or controlnet_cond.shape[-2] % sample.shape[-2]:
        raise ValueError(
            f"ControlNet condition {tuple(controlnet_cond.shape[-2:])} is not a whole multiple of the latent "
            f"{tuple(sample.shape[-2:])}"
        )
    deferred = DeferredControl(original, sample, timestep, encoder_hidden_states, controlnet_cond,
                               {"conditioning_scale": conditioning_scale, **kwargs})
    return deferred, None  # diffusers' ControlNet pipelines unpack (down, mid) whatever return_dict says


@contextmanager
def _patched(model, forward):
    """model.forward replaced by forward for the block; an instance-level forward (accelerate's offload hook) is kept
    and restored."""
    had_own = "forward" in model.__dict__
    original = model.forward
    model.forward = forward(original)
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


@contextmanager
def tiled_denoiser(pipe, settings: TileSettings, stats: dict | None = None, *, forward):
    """Within the block, every call of the pipeline's denoiser runs tiled; `stats` counts calls and tiles.

    `forward` is the family's tiled forward (`Family.tiled_forward_function()`: unet_forward below for UNets).
    A pipeline with a ControlNet (`pipe.controlnet`) has it deferred to the tiled UNet (see DeferredControl).
    """
    model = denoiser_of(pipe)
    stats = stats if stats is not None else {}
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None and type(controlnet).__name__ != "ControlNetModel":
        raise ValueError(f"tiled denoising takes one ControlNetModel, not {type(controlnet).__name__}")
    with ExitStack() as stack:
        stack.enter_context(_patched(model, lambda original: functools.partial(forward, model, original, settings,
                                                                               stats)))
        if controlnet is not None:
            stack.enter_context(_patched(controlnet, lambda original: functools.partial(defer_controlnet, original)))
        yield


def count_tiles(stats: dict, tiles: list[Tile], batch: int) -> None:
    stats["steps"] = stats.get("steps", 0) + 1
    stats["tiles"] = stats.get("tiles", 0) + len(tiles)
    stats["calls"] = stats.get("calls", 0) + -(-len(tiles) // batch)


def repeat_batch(value, batch: int, times: int):
    """Repeat every tensor whose first dim is the CFG batch `times` times (tile-major), recursing into dicts."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat(times, *([1] * (value.ndim - 1)))
    if isinstance(value, dict):
        return {key: repeat_batch(item, batch, times) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(repeat_batch(item, batch, times) for item in value)
    return value


def transformer_output(out: torch.Tensor, return_dict: bool):
    """A tiled DiT forward's result as the model's own forward returns it: (out,) or Transformer2DModelOutput."""
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=out)


def refuse_residuals(kwargs: dict) -> None:
    for name in ("down_block_additional_residuals", "mid_block_additional_residual", "block_controlnet_hidden_states",
                 "controlnet_block_samples", "down_intrablock_additional_residuals"):
        if kwargs.get(name) is not None:
            raise ValueError(f"tiled denoising does not take ControlNet residuals ({name}); use highres.tiled=false")


def _tile_time_ids(time_ids: torch.Tensor, chunk: list[Tile], scale: int) -> torch.Tensor:
    """SDXL/Kolors size conditioning per tile: "a tile-sized crop at (top, left) of the full original image"."""
    per_tile = []
    for tile in chunk:
        ids = time_ids.clone()
        ids[:, 2] += tile.top * scale  # crop top-left inside the original image
        ids[:, 3] += tile.left * scale
        if ids.shape[1] == 6:  # (original, crop, target); the 5-column refiner form has no target
            ids[:, 4], ids[:, 5] = tile.height * scale, tile.width * scale
        per_tile.append(ids)
    return torch.cat(per_tile)


def unet_forward(model, original, settings: TileSettings, stats, sample, timestep, encoder_hidden_states, **kwargs):
    """UNet2DConditionModel.forward over tiles; SDXL/Kolors time_ids become each tile's crop of the full image, and a
    deferred ControlNet runs on the same tiles."""
    control = kwargs.pop("down_block_additional_residuals", None)
    if control is not None and not isinstance(control, DeferredControl):
        kwargs["down_block_additional_residuals"] = control  # refused just below
    if isinstance(control, DeferredControl) and kwargs.pop("mid_block_additional_residual", None) is not None:
        raise ValueError("a deferred ControlNet call came with a mid-block residual of its own")
    refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    height, width = sample.shape[-2:]
    tiles = tile_layout(height, width, settings.tile_size, settings.tile_overlap, settings.align)
    batch = sample.shape[0]
    count_tiles(stats, tiles, settings.tile_batch_size)
    scale = settings.vae_scale_factor

    def run(chunk: list[Tile], crops: torch.Tensor) -> torch.Tensor:
        times = len(chunk)
        call = repeat_batch(kwargs, batch, times)
        added = kwargs.get("added_cond_kwargs")
        time_ids = None
        if added is not None and "time_ids" in added and len(tiles) > 1:
            time_ids = _tile_time_ids(added["time_ids"], chunk, scale)
            call["added_cond_kwargs"] = {**call["added_cond_kwargs"], "time_ids": time_ids}
        if isinstance(control, DeferredControl):
            down, mid = control.run(chunk, time_ids)
            call["down_block_additional_residuals"], call["mid_block_additional_residual"] = down, mid
            stats["control_calls"] = stats.get("control_calls", 0) + 1
        return original(
            crops, repeat_batch(timestep, batch, times), repeat_batch(encoder_hidden_states, batch, times),
            **call, return_dict=False,
        )[0]

    out = tiled_apply(run, sample, tiles, settings.tile_overlap, settings.tile_batch_size, settings.pad_last_batch)
    if not return_dict:
        return (out,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=out)
