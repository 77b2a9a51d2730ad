"""Stable Diffusion 3 (stabilityai/stable-diffusion-3-medium-diffusers): an MMDiT trained with flow matching,
with CLIP-L, CLIP-G and T5-XXL text encoders."""

from __future__ import annotations

from synth.families.base import FLOW, Family
from synth.families.sdxl import CLIP_L_AND_G


class SD3(Family):
    name = "sd3"
    text2img = "diffusers:StableDiffusion3Pipeline"
    img2img = "diffusers:StableDiffusion3Img2ImgPipeline"
    size_step = 16  # VAE factor 8 x patch size 2
    single_file = True
    denoiser = "transformer"
    prediction = FLOW
    objective = "synth.train.objectives:SD3"
    tiled_forward = "synth.families.sd3:tiled_forward"
    twin_builder = "synth.twins:_build_sd3"
    # add add_q_proj, add_k_proj, add_v_proj, to_add_out to lora.target_modules for the text stream
    textual_inversion_targets = CLIP_L_AND_G  # the CLIP-L and CLIP-G of SD1.x and SDXL: their embeddings fit
    max_sequence_length_limit = 512  # T5's, as StableDiffusion3Pipeline takes it
    untiled_limit_px = 3072  # SD3-medium's pos_embed_max_size 192 x patch 2 x VAE 8 (the loaded config decides later)
    tile_step_reason = "the patch size"

    def load_kwargs(self, model_cfg) -> dict:
        # Dropping T5 saves ~9 GB; the pipeline then pads the T5 slot with zeros, as in sd3_medium_incl_clips.
        return {} if model_cfg.get("t5", True) else {"text_encoder_3": None, "tokenizer_3": None}

    def call_kwargs(self, model_cfg, task, width, height) -> dict:
        # The SD3 img2img pipeline defaults its size to the transformer's sample size, not the image's.
        return {"width": width, "height": height, "max_sequence_length": model_cfg.get("max_sequence_length", 256)}

    def img2img_steps(self, steps: int, strength: float) -> int:
        # StableDiffusion3Img2ImgPipeline skips int(steps - steps * strength) steps, so it rounds up.
        return steps - int(max(steps - steps * strength, 0))

    def encode_prompt(self, pipe, prompt, negative, guidance, model_cfg) -> dict:
        """CLIP-L ++ CLIP-G states zero-padded to T5's width, then T5's states along the sequence
        (StableDiffusion3Pipeline.encode_prompt, with CLIP chunks; T5 keeps model.max_sequence_length)."""
        import torch

        from synth.prompt_encoding import clip_texts, count_chunks, plain_text, two_clips

        max_length = int(model_cfg.get("max_sequence_length", 256))
        device = pipe._execution_device
        positive, negative_texts = clip_texts(pipe, prompt), clip_texts(pipe, negative)
        count = count_chunks(pipe, positive, negative_texts) if guidance else count_chunks(pipe, positive)

        def encode(texts: dict, t5_text: str):
            clip, pooled = two_clips(pipe, texts, count)
            with torch.no_grad():
                t5 = pipe._get_t5_prompt_embeds(prompt=t5_text, max_sequence_length=max_length, device=device)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5.to(clip.dtype)], dim=-2), pooled

        embeds, pooled = encode(positive, plain_text(prompt))
        call = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guidance:
            call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"] = encode(
                negative_texts, plain_text(negative))
        return call

    def untiled_limit(self, pipe) -> int | None:
        return pos_embed_limit(pipe.transformer)


def pos_embed_limit(model) -> int | None:
    """The largest latent side SD3's positional embedding covers (pos_embed_max_size patches), or None: read from
    the transformer's config."""
    config = model.config
    if config.get("pos_embed_max_size") is None:
        return None
    return config.pos_embed_max_size * config.patch_size


def tiled_forward(model, original, settings, stats, hidden_states, *args, **kwargs):
    """SD3Transformer2DModel.forward over tiles, each with its window of the sin-cos positional embedding, batched
    per tile; above the embedding's limit each tile takes the centred crop an image of its size would get."""
    import torch

    from synth.tiled_denoiser import count_tiles, refuse_residuals, repeat_batch
    from synth.tiling import tile_layout, tiled_apply

    refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    patch_embed = model.pos_embed
    patch = patch_embed.patch_size
    height, width = hidden_states.shape[-2:]
    limit = pos_embed_limit(model)
    tile_size = min(settings.tile_size, limit) if limit else settings.tile_size
    tiles = tile_layout(height, width, tile_size, min(settings.tile_overlap, tile_size - patch), patch)
    batch = hidden_states.shape[0]
    count_tiles(stats, tiles, settings.tile_batch_size)
    if len(tiles) == 1:
        return original(hidden_states, *args, **kwargs, return_dict=return_dict)
    full_fits = limit is None or (height <= limit and width <= limit)
    crop = patch_embed.cropped_pos_embed  # the bound method, before we shadow it
    full = crop(height, width).reshape(height // patch, width // patch, -1) if full_fits else None

    def run(chunk, crops):
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
            return original(crops, *repeat_batch(args, batch, len(chunk)), **repeat_batch(kwargs, batch, len(chunk)),
                            return_dict=False)[0]
        finally:
            del patch_embed.cropped_pos_embed

    out = tiled_apply(run, hidden_states, tiles, settings.tile_overlap, settings.tile_batch_size)
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=out)
