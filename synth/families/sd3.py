"""Stable Diffusion 3 (stabilityai/stable-diffusion-3-medium-diffusers) and its SD3.5 variants: an MMDiT trained
with flow matching, with CLIP-L, CLIP-G and T5-XXL text encoders.

SD3.5 Large, Large Turbo and Medium are configs of this family (conf/model/sd35_*.yaml): their transformers differ
only in what SD3Transformer2DModel's config already says (QK norm, Medium's dual-attention MMDiT-X layers, a larger
positional embedding), and Medium's skip-layer guidance is StableDiffusion3Pipeline's own, set by
model.skip_layer_guidance.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from synth.families.base import FLOW, Family
from synth.families.sdxl import CLIP_L_AND_G
from synth.train.objectives import FlowMatching

if TYPE_CHECKING:
    from pathlib import Path

    from synth.twin_parts import TwinSize


class SD3(Family):
    name = "sd3"
    text2img = "diffusers:StableDiffusion3Pipeline"
    img2img = "diffusers:StableDiffusion3Img2ImgPipeline"
    size_step = 16  # VAE factor 8 x patch size 2
    single_file = True
    denoiser = "transformer"
    repeated_blocks = ("JointTransformerBlock",)  # diffusers 0.42's SD3Transformer2DModel declares no _repeated_blocks
    prediction = FLOW
    objective = "synth.families.sd3:Objective"
    tiled_forward = "synth.families.sd3:tiled_forward"
    twin_builder = "synth.families.sd3:build_twin"
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
        call = {"width": width, "height": height, "max_sequence_length": model_cfg.get("max_sequence_length", 256)}
        guidance = model_cfg.get("skip_layer_guidance")
        if task == "text2img" and guidance and guidance.get("layers"):
            # StableDiffusion3Pipeline's skip-layer guidance (SD3.5 Medium's model card); diffusers'
            # img2img pipeline has none, so the refinement stages of the high-res chain run without it.
            call.update(
                skip_guidance_layers=list(guidance.layers),
                skip_layer_guidance_scale=float(guidance.scale),
                skip_layer_guidance_start=float(guidance.start),
                skip_layer_guidance_stop=float(guidance.stop),
            )
        return call

    def check_model(self, cfg) -> None:
        """model.skip_layer_guidance: layer indices, a scale >= 0 and 0 <= start < stop <= 1; text-to-image with
        classifier-free guidance only (StableDiffusion3Pipeline applies it inside its CFG branch)."""
        guidance = cfg.model.get("skip_layer_guidance")
        if not guidance or not guidance.get("layers"):
            return
        layers = guidance.layers
        if not all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in layers):
            raise ValueError(f"model.skip_layer_guidance.layers={list(layers)}: give transformer block indices "
                             "(integers >= 0), e.g. [7,8,9]")
        scale, start, stop = guidance.get("scale"), guidance.get("start"), guidance.get("stop")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
            raise ValueError(f"model.skip_layer_guidance.scale={scale}: must be a finite number >= 0")
        for key, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"model.skip_layer_guidance.{key}={value}: a fraction of the steps, in [0, 1]")
        if not start < stop:
            raise ValueError(f"model.skip_layer_guidance: start={start} must be below stop={stop}")
        cfg_scale = cfg.guidance_scale if cfg.guidance_scale is not None else cfg.model.guidance_scale
        if cfg_scale <= 1:
            raise ValueError(f"model.skip_layer_guidance with guidance_scale={cfg_scale}: skip-layer guidance runs "
                             "with classifier-free guidance only; raise guidance_scale above 1 or set "
                             "model.skip_layer_guidance.layers=null")
        if cfg.init_image is not None:
            raise ValueError("model.skip_layer_guidance: diffusers' StableDiffusion3Img2ImgPipeline has no skip-layer "
                             "guidance; it works for text-to-image (drop init_image, or set "
                             "model.skip_layer_guidance.layers=null)")

    def check_loaded(self, pipe, model_cfg) -> None:
        """Skip-layer guidance names blocks the loaded transformer has (diffusers ignores others silently)."""
        guidance = model_cfg.get("skip_layer_guidance")
        if not guidance or not guidance.get("layers"):
            return
        blocks = pipe.transformer.config.num_layers
        missing = [layer for layer in guidance.layers if layer >= blocks]
        if missing:
            raise ValueError(f"model.skip_layer_guidance.layers={list(guidance.layers)}: this transformer has "
                             f"{blocks} blocks (0..{blocks - 1}); {missing} do not exist")

    def img2img_steps(self, steps: int, strength: float) -> int:
        # StableDiffusion3Img2ImgPipeline skips int(steps - steps * strength) steps, so it rounds up.
        return steps - int(max(steps - steps * strength, 0))

    def encode_prompt(self, pipe, prompt, negative, guidance, model_cfg) -> dict:
        """CLIP-L ++ CLIP-G states zero-padded to T5's width, then T5's states along the sequence
        (StableDiffusion3Pipeline.encode_prompt, with CLIP chunks; T5 keeps model.max_sequence_length)."""
        import torch

        from synth.prompt_encoding import (
            clip_texts,
            count_chunks,
            plain_text,
            two_clips,
        )

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

    # LoRA import
    lora_markers = ("joint_blocks_", "context_block", "add_q_proj", "lora_te3_", "text_encoder_3.")

    @property
    def lora_prefixes(self):
        return (*super().lora_prefixes, ("text_encoder_2.", "text_encoder_2"), ("lora_te2_", "text_encoder_2"),
                ("text_encoder_3.", "text_encoder_3"), ("lora_te3_", "text_encoder_3"))

    def lora_module_targets(self, component, name, underscored, model):
        """kohya's SD3 LoRAs name SAI's MMDiT (joint_blocks_N_x_block_attn_qkv, one fused qkv): the diffusers layers
        they become, a fused qkv split into three chunks of rows. adaLN modulation layers are not mapped (their
        chunk order differs between the two models)."""
        match = re.fullmatch(r"joint_blocks_(\d+)_(x|context)_block_(.+)", name) if underscored else None
        if match is None:
            return [(name, 0, 1)]
        block, stream, layer = match.groups()
        targets = MMDIT_LAYERS[stream].get(layer)
        if targets is None:
            return []
        return [(f"transformer_blocks_{block}_{target}", chunk, len(targets)) for chunk, target in enumerate(targets)]

    # LoRA export
    lora_export_form = "diffusers_alpha"  # diffusers keys + per-module alpha: ComfyUI reads them at alpha / rank
    # (diffusers refuses the .alpha tensors, so they go in lora.comfyui.safetensors beside lora.safetensors)
    ss_base_model_version = "sd3"
    modelspec_architecture = "stable-diffusion-v3-medium"


def pos_embed_limit(model) -> int | None:
    """The largest latent side SD3's positional embedding covers (pos_embed_max_size patches), or None: read from
    the transformer's config."""
    config = model.config
    if config.get("pos_embed_max_size") is None:
        return None
    return config.pos_embed_max_size * config.patch_size


# LoRA import: SAI's MMDiT layer names (kohya's SD3 LoRAs) -> diffusers' SD3Transformer2DModel layers
MMDIT_LAYERS = {
    "x": {"attn_qkv": ("attn_to_q", "attn_to_k", "attn_to_v"), "attn_proj": ("attn_to_out_0",),
          "attn2_qkv": ("attn2_to_q", "attn2_to_k", "attn2_to_v"), "attn2_proj": ("attn2_to_out_0",),
          "mlp_fc1": ("ff_net_0_proj",), "mlp_fc2": ("ff_net_2",)},
    "context": {"attn_qkv": ("attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"),
                "attn_proj": ("attn_to_add_out",), "mlp_fc1": ("ff_context_net_0_proj",),
                "mlp_fc2": ("ff_context_net_2",)},
}

def tiled_forward(model, original, settings, stats, hidden_states, *args, **kwargs):
    """SD3Transformer2DModel.forward over tiles, each with its window of the sin-cos positional embedding, batched
    per tile; above the embedding's limit each tile takes the centred crop an image of its size would get."""
    import torch

    from synth.tiled_denoiser import (
        count_tiles,
        refuse_residuals,
        repeat_batch,
        transformer_output,
    )
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

    out = tiled_apply(run, hidden_states, tiles, settings.tile_overlap, settings.tile_batch_size, settings.pad_last_batch)
    return transformer_output(out, return_dict)


# --- the training objective (synth/train/objectives.py holds the machinery) ---


class Objective(FlowMatching):
    """SD3: flow matching on the MMDiT, conditioned on CLIP-L ++ CLIP-G ++ T5 states and the pooled CLIP embeddings
    (StableDiffusion3Pipeline.encode_prompt; T5 keeps objective.max_sequence_length)."""

    num_text_encoders = 3

    def encode_text(self, prompts, device) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[p[0] for p in prompts], prompt_2=[p[1] for p in prompts], prompt_3=[p[2] for p in prompts],
            device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=int(self.cfg.get("max_sequence_length") or 256),
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            pooled_projections=cond["pooled_projections"].to(noisy.dtype),
            return_dict=False,
        )[0]


# --- the offline twin (synth.twins builds and caches it; the parts are synth.twin_parts) ---


def build_twin(size: TwinSize, seed: int, scratch: Path, qk_norm: str | None = None,
               dual_attention_layers: tuple[int, ...] = (), pos_embed_max_size: int = 64):
    """SD3: CLIP-L + CLIP-G (both projected) + T5, MMDiT with patch 2, 16-channel VAE, flow matching.

    The options give SD3.5's twins their architecture: qk_norm="rms_norm" (Large and Medium),
    dual_attention_layers (Medium's MMDiT-X blocks) and pos_embed_max_size (patches per side; 64 covers 1024 px).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from synth.twin_parts import (
        CHANNELS_PER_HEAD,
        build_clip_text_encoder,
        build_clip_tokenizer,
        build_t5_encoder,
        build_t5_tokenizer,
        build_vae,
        seed_component,
    )

    tokenizer = build_clip_tokenizer(scratch / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(scratch / "tokenizer_2", pad_token="!")
    tokenizer_3 = build_t5_tokenizer(scratch / "tokenizer_3", model_max_length=512)  # T5's context
    clip_l_width, clip_g_width = size.text_width, size.wide_text_width
    # The pipeline zero-pads CLIP-L ++ CLIP-G features up to T5's width, so T5 must be at least as wide.
    t5_width = 2 * (clip_l_width + clip_g_width)
    seed_component(seed, "text_encoder")
    text_encoder = build_clip_text_encoder(tokenizer, clip_l_width, size.text_layers, big=False, with_projection=True)
    seed_component(seed, "text_encoder_2")
    text_encoder_2 = build_clip_text_encoder(tokenizer_2, clip_g_width, size.text_layers, big=True, with_projection=True)
    seed_component(seed, "text_encoder_3")
    text_encoder_3 = build_t5_encoder(tokenizer_3, t5_width, size.text_layers)
    seed_component(seed, "transformer")
    transformer = SD3Transformer2DModel(
        sample_size=size.sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=size.dit_layers,
        attention_head_dim=CHANNELS_PER_HEAD,
        num_attention_heads=size.dit_width // CHANNELS_PER_HEAD,
        joint_attention_dim=t5_width,
        caption_projection_dim=size.dit_width,
        pooled_projection_dim=clip_l_width + clip_g_width,  # CLIP-L pooled ++ CLIP-G pooled
        pos_embed_max_size=pos_embed_max_size,
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    seed_component(seed, "vae")
    # SD3's VAE: 16 latent channels, its published shift and scale, no quant convs.
    vae = build_vae(
        size,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # stabilityai/stable-diffusion-3-medium-diffusers scheduler: 1000 steps, timestep shift 3.0.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
