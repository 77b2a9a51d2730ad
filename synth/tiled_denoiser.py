"""Run a pipeline's denoiser (UNet or DiT) on overlapping latent tiles, blended per step (MultiDiffusion).

`tiled_denoiser(pipe, settings)` swaps the denoiser's forward for the duration of a pipeline call: the
pipeline keeps its own loop, classifier-free guidance and scheduler step on the whole latent, and each
denoiser call becomes batches of tiles (tiles x CFG batch), blended by synth.tiling. What each family needs
per tile lives in one function per family below:

- UNets (sd15, sdxl, kolors): crops; SDXL/Kolors size conditioning says "a tile_h x tile_w crop at
  (top, left) of the full original image", consistent with the untiled call. A ControlNet (sd15, sdxl
  refinement) is deferred: its call on the whole latent becomes a `DeferredControl`, and the tiled UNet runs
  it per tile on the same crop of the latent and the matching crop of the condition image, so neither the
  ControlNet nor its residuals ever run at full size.
- SD3: the sin-cos positional embedding of the tile's own window of the full image's embedding, batched per
  tile; above the embedding's limit (pos_embed_max_size patches, 3072 px for SD3-medium) each tile takes the
  centred crop an image of its size would get.
- Hunyuan-DiT: the tile's rows of the full image's rotary embedding; one tile per call, because the rotary
  embedding is shared by the whole batch.
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
        kwargs = _repeat(self.kwargs, batch, len(chunk))
        if time_ids is not None:
            kwargs["added_cond_kwargs"] = {**kwargs["added_cond_kwargs"], "time_ids": time_ids}
        return self.forward(sample, _repeat(self.timestep, batch, len(chunk)),
                            _repeat(self.encoder_hidden_states, batch, len(chunk)), cond, **kwargs, return_dict=False)


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
def tiled_denoiser(pipe, settings: TileSettings, stats: dict | None = None):
    """Within the block, every call of the pipeline's denoiser runs tiled; `stats` counts calls and tiles.

    A pipeline with a ControlNet (`pipe.controlnet`) has it deferred to the tiled UNet (see DeferredControl).
    """
    model = denoiser_of(pipe)
    forward = {"UNet2DConditionModel": unet_forward, "SD3Transformer2DModel": sd3_forward}.get(
        type(model).__name__, hunyuan_forward if type(model).__name__ == "HunyuanDiT2DModel" else None
    )
    if forward is None:
        raise ValueError(f"no tiled denoiser for {type(model).__name__}")
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


def _count(stats: dict, tiles: list[Tile], batch: int) -> None:
    stats["steps"] = stats.get("steps", 0) + 1
    stats["tiles"] = stats.get("tiles", 0) + len(tiles)
    stats["calls"] = stats.get("calls", 0) + -(-len(tiles) // batch)


def _repeat(value, batch: int, times: int):
    """Repeat every tensor whose first dim is the CFG batch `times` times (tile-major), recursing into dicts."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat(times, *([1] * (value.ndim - 1)))
    if isinstance(value, dict):
        return {key: _repeat(item, batch, times) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(item, batch, times) for item in value)
    return value


def _refuse_residuals(kwargs: dict) -> None:
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
    _refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    height, width = sample.shape[-2:]
    tiles = tile_layout(height, width, settings.tile_size, settings.tile_overlap, settings.align)
    batch = sample.shape[0]
    _count(stats, tiles, settings.tile_batch_size)
    scale = settings.vae_scale_factor

    def run(chunk: list[Tile], crops: torch.Tensor) -> torch.Tensor:
        times = len(chunk)
        call = _repeat(kwargs, batch, times)
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
            crops, _repeat(timestep, batch, times), _repeat(encoder_hidden_states, batch, times),
            **call, return_dict=False,
        )[0]

    out = tiled_apply(run, sample, tiles, settings.tile_overlap, settings.tile_batch_size)
    if not return_dict:
        return (out,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=out)


def sd3_pos_embed_limit(model) -> int | None:
    """The largest latent side SD3's positional embedding covers (pos_embed_max_size patches), or None."""
    patch_embed = model.pos_embed
    if getattr(patch_embed, "pos_embed_max_size", None) is None:
        return None
    return patch_embed.pos_embed_max_size * patch_embed.patch_size


def sd3_forward(model, original, settings: TileSettings, stats, hidden_states, *args, **kwargs):
    """SD3Transformer2DModel.forward over tiles, each with its window of the positional embedding."""
    _refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    patch_embed = model.pos_embed
    patch = patch_embed.patch_size
    height, width = hidden_states.shape[-2:]
    limit = sd3_pos_embed_limit(model)
    tile_size = min(settings.tile_size, limit) if limit else settings.tile_size
    tiles = tile_layout(height, width, tile_size, min(settings.tile_overlap, tile_size - patch), patch)
    batch = hidden_states.shape[0]
    _count(stats, tiles, settings.tile_batch_size)
    if len(tiles) == 1:
        return original(hidden_states, *args, **kwargs, return_dict=return_dict)
    full_fits = limit is None or (height <= limit and width <= limit)
    crop = patch_embed.cropped_pos_embed  # the bound method, before we shadow it
    full = crop(height, width).reshape(height // patch, width // patch, -1) if full_fits else None

    def run(chunk: list[Tile], crops: torch.Tensor) -> torch.Tensor:
        embeds = []
        for tile in chunk:
            if full is not None:
                rows = slice(tile.top // patch, (tile.top + tile.height) // patch)
                columns = slice(tile.left // patch, (tile.left + tile.width) // patch)
                embed = full[rows, columns].reshape(1, -1, full.shape[-1])
            else:
                embed = crop(tile.height, tile.width)
            embeds.append(embed.expand(batch, -1, -1))
        stacked = torch.cat(embeds)  # (tiles * batch, patches, dim): one embedding per batch row
        patch_embed.cropped_pos_embed = lambda *_: stacked
        try:
            return original(crops, *_repeat(args, batch, len(chunk)), **_repeat(kwargs, batch, len(chunk)),
                            return_dict=False)[0]
        finally:
            del patch_embed.cropped_pos_embed

    out = tiled_apply(run, hidden_states, tiles, settings.tile_overlap, settings.tile_batch_size)
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=out)


def hunyuan_forward(model, original, settings: TileSettings, stats, hidden_states, timestep, encoder_hidden_states=None,
                    **kwargs):
    """HunyuanDiT2DModel.forward over tiles: each gets its rows of the rotary embedding and its size conditioning."""
    _refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    patch = model.config.patch_size
    height, width = hidden_states.shape[-2:]
    tiles = tile_layout(height, width, settings.tile_size, settings.tile_overlap, patch)
    _count(stats, tiles, 1)
    if len(tiles) == 1:
        return original(hidden_states, timestep, encoder_hidden_states, **kwargs, return_dict=return_dict)
    rotary = kwargs.pop("image_rotary_emb")
    grid = (height // patch, width // patch)
    rotary = tuple(part.reshape(*grid, part.shape[-1]) for part in rotary)
    meta = kwargs.pop("image_meta_size", None)
    scale = settings.vae_scale_factor

    def run(chunk: list[Tile], crops: torch.Tensor) -> torch.Tensor:
        (tile,) = chunk  # the rotary embedding is shared by the batch, so one tile per call
        rows = slice(tile.top // patch, (tile.top + tile.height) // patch)
        columns = slice(tile.left // patch, (tile.left + tile.width) // patch)
        tile_rotary = tuple(part[rows, columns].reshape(-1, part.shape[-1]) for part in rotary)
        tile_meta = meta
        if meta is not None:  # (original h, w, target h, w, crop top, left)
            tile_meta = meta.clone()
            tile_meta[:, 2], tile_meta[:, 3] = tile.height * scale, tile.width * scale
            tile_meta[:, 4] += tile.top * scale
            tile_meta[:, 5] += tile.left * scale
        return original(crops, timestep, encoder_hidden_states, **kwargs, image_meta_size=tile_meta,
                        image_rotary_emb=tile_rotary, return_dict=False)[0]

    out = tiled_apply(run, hidden_states, tiles, settings.tile_overlap, 1)
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=out)
