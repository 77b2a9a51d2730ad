"""Hunyuan-DiT (Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers): a DiT with rotary embeddings and bilingual CLIP +
mT5 text encoders; its image-to-image pipeline is synth's own (hunyuan_dit_img2img.py, diffusers has none)."""

from __future__ import annotations

from synth.families.base import Family


class HunyuanDiT(Family):
    name = "hunyuan_dit"
    text2img = "diffusers:HunyuanDiTPipeline"
    img2img = "synth.families.hunyuan_dit_img2img:HunyuanDiTImg2ImgPipeline"
    size_step = 16  # VAE factor 8 x patch size 2
    denoiser = "transformer"
    objective = "synth.train.objectives:HunyuanDiT"
    tiled_forward = "synth.families.hunyuan_dit:tiled_forward"
    twin_builder = "synth.twins:_build_hunyuan_dit"
    peft_loaded = True  # HunyuanDiT2DModel has no diffusers LoRA mixin
    tile_step_reason = "the patch size"

    def call_kwargs(self, model_cfg, task, width, height) -> dict:
        # Resolution binning silently replaces the requested size with the nearest trained bucket.
        return {"width": width, "height": height, "use_resolution_binning": False}

    # encode_prompt: the base's; the pipeline reads the text (BERT 77 and mT5 256 tokens, fixed by the model)


def tiled_forward(model, original, settings, stats, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
    """HunyuanDiT2DModel.forward over tiles: each gets its rows of the rotary embedding and its size conditioning;
    one tile per call, because the rotary embedding is shared by the whole batch."""
    from synth.tiled_denoiser import count_tiles, refuse_residuals
    from synth.tiling import tile_layout, tiled_apply

    refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    patch = model.config.patch_size
    height, width = hidden_states.shape[-2:]
    tiles = tile_layout(height, width, settings.tile_size, settings.tile_overlap, patch)
    count_tiles(stats, tiles, 1)
    if len(tiles) == 1:
        return original(hidden_states, timestep, encoder_hidden_states, **kwargs, return_dict=return_dict)
    rotary = kwargs.pop("image_rotary_emb")
    grid = (height // patch, width // patch)
    rotary = tuple(part.reshape(*grid, part.shape[-1]) for part in rotary)
    meta = kwargs.pop("image_meta_size", None)
    scale = settings.vae_scale_factor

    def run(chunk, crops):
        (tile,) = chunk
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
