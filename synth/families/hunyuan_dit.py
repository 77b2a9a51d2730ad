"""Hunyuan-DiT (Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers): a DiT with rotary embeddings and bilingual CLIP +
mT5 text encoders; its image-to-image pipeline is synth's own (hunyuan_dit_img2img.py, diffusers has none)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from synth.families.base import Family
from synth.train.objectives import NoisePrediction

if TYPE_CHECKING:
    from pathlib import Path

    from synth.twin_parts import TwinSize


class HunyuanDiT(Family):
    name = "hunyuan_dit"
    text2img = "diffusers:HunyuanDiTPipeline"
    img2img = "synth.families.hunyuan_dit_img2img:HunyuanDiTImg2ImgPipeline"
    size_step = 16  # VAE factor 8 x patch size 2
    denoiser = "transformer"
    repeated_blocks = ("HunyuanDiTBlock",)  # diffusers 0.42's HunyuanDiT2DModel declares no _repeated_blocks

    def check_train(self, cfg) -> None:
        if cfg.gradient_checkpointing:
            # diffusers 0.42's HunyuanDiT2DModel sets _supports_gradient_checkpointing = False (its blocks have no
            # checkpointed path), so enable_gradient_checkpointing raises after the weights load
            raise ValueError("gradient_checkpointing=true: diffusers' Hunyuan-DiT transformer does not support it; "
                             "use gradient_checkpointing=false (data.cache=true and a smaller data.size save memory)")
    objective = "synth.families.hunyuan_dit:Objective"
    tiled_forward = "synth.families.hunyuan_dit:tiled_forward"
    twin_builder = "synth.families.hunyuan_dit:build_twin"
    peft_loaded = True  # HunyuanDiT2DModel has no diffusers LoRA mixin
    tile_step_reason = "the patch size"

    def call_kwargs(self, model_cfg, task, width, height) -> dict:
        # Resolution binning silently replaces the requested size with the nearest trained bucket.
        return {"width": width, "height": height, "use_resolution_binning": False}

    # encode_prompt: the base's; the pipeline reads the text (BERT 77 and mT5 256 tokens, fixed by the model)

    # LoRA import
    lora_markers = ("base_model.model.blocks", "Wqkv", "kv_proj", "default_modulation")

    @property
    def lora_prefixes(self):
        # the official HunyuanDiT LoRAs: peft's save of Tencent's own model (ComfyUI reads the same form)
        return (*super().lora_prefixes, ("base_model.model.", self.denoiser))

    def lora_module_targets(self, component, name, underscored, model):
        """Tencent's HunyuanDiT names (blocks.N.attn1.Wqkv, attn2.kv_proj, mlp.fc1, ...) as diffusers' layers, the
        fused Wqkv and kv_proj split into chunks of rows (as scripts/convert_hunyuandit_to_diffusers.py splits
        the weights)."""
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name) if not underscored else None
        if match is None or match.group(2) not in HUNYUAN_LAYERS:
            return [(name, 0, 1)]
        targets = HUNYUAN_LAYERS[match.group(2)]
        return [(f"blocks.{match.group(1)}.{target}", 0, 1) for target in targets]

    # LoRA export
    lora_export_form = "official_fused"  # base_model.model.<fused original layers>: ComfyUI's Hunyuan-DiT form
    ss_base_model_version = "hunyuan_dit"
    modelspec_architecture = "hunyuan-dit"

    @property
    def lora_fused_layers(self) -> dict:
        """diffusers layer -> (official fused layer, position, members) for the official form's attention layers:
        HUNYUAN_LAYERS inverted (attn1.to_k -> attn1.Wqkv, 1 of 3)."""
        return {member: (official, position, len(members)) for official, members in HUNYUAN_LAYERS.items()
                if official.startswith(("attn1.", "attn2.")) for position, member in enumerate(members)}


# LoRA import: Tencent's HunyuanDiT layer names (in a block) -> diffusers' HunyuanDiT2DModel layers
HUNYUAN_LAYERS = {
    "attn1.Wqkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn1.out_proj": ("attn1.to_out.0",),
    "attn2.q_proj": ("attn2.to_q",), "attn2.kv_proj": ("attn2.to_k", "attn2.to_v"),
    "attn2.out_proj": ("attn2.to_out.0",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",),
    "default_modulation.1": ("norm1.linear",),
}



def tiled_forward(model, original, settings, stats, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
    """HunyuanDiT2DModel.forward over tiles: each gets its rows of the rotary embedding and its size conditioning;
    one tile per call, because the rotary embedding is shared by the whole batch."""
    from synth.tiled_denoiser import count_tiles, refuse_residuals, transformer_output
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

    return transformer_output(tiled_apply(run, hidden_states, tiles, settings.tile_overlap, 1), return_dict)


# --- the training objective (synth/train/objectives.py holds the machinery) ---


class Objective(NoisePrediction):
    """Hunyuan-DiT: v prediction on DDPM, bilingual CLIP + mT5 context, 2D RoPE (Li et al., 2024).

    The transformer's inputs follow diffusers' HunyuanDiTPipeline.__call__ (step 7 and the denoising loop).
    """

    num_text_encoders = 2

    def encode_text(self, prompts, device) -> dict:
        cond = {}
        for index, (embeds_key, mask_key, length) in enumerate(
            (("encoder_hidden_states", "text_embedding_mask", 77), ("encoder_hidden_states_t5", "text_embedding_mask_t5", 256))
        ):
            embeds, _, mask, _ = self.pipe.encode_prompt(
                [p[index] for p in prompts], device=device, dtype=self.pipe.transformer.dtype,
                num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=length, text_encoder_index=index,
            )
            cond[embeds_key], cond[mask_key] = embeds, mask
        return cond

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        import torch
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import (
            get_resize_crop_region_for_grid,
        )

        patch = denoiser.config.patch_size
        grid_height, grid_width = noisy.shape[2] // patch, noisy.shape[3] // patch
        base_size = 512 // 8 // patch
        rotary = get_2d_rotary_pos_embed(
            denoiser.inner_dim // denoiser.num_heads,
            get_resize_crop_region_for_grid((grid_height, grid_width), base_size),
            (grid_height, grid_width),
            device=noisy.device,
            output_type="pt",
        )
        # Hunyuan-DiT orders its size ids original, target, crop (SDXL: original, crop, target).
        meta = torch.cat([batch["original_size"], batch["target_size"], batch["crop_top_left"]], dim=1).to(noisy)
        style = torch.zeros(noisy.shape[0], dtype=torch.long, device=noisy.device)
        output = denoiser(
            noisy,
            timesteps.to(noisy.dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            text_embedding_mask=cond["text_embedding_mask"],
            encoder_hidden_states_t5=cond["encoder_hidden_states_t5"].to(noisy.dtype),
            text_embedding_mask_t5=cond["text_embedding_mask_t5"],
            image_meta_size=meta,
            style=style,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        prediction, _ = output.chunk(2, dim=1)  # the second half is the learned variance, not trained here
        return prediction



# --- the offline twin (synth.twins builds and caches it; the parts are synth.twin_parts) ---


def build_twin(size: TwinSize, seed: int, scratch: Path):
    """Hunyuan-DiT: BERT + mT5 encoders, DiT with patch 2 and cross attention, DDPM with v-prediction."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    from synth.twin_parts import (
        CHANNELS_PER_HEAD,
        build_bert_tokenizer,
        build_t5_encoder,
        build_t5_tokenizer,
        build_vae,
        seed_component,
    )

    tokenizer = build_bert_tokenizer(scratch / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(scratch / "tokenizer_2", model_max_length=1024)  # mT5's context
    seed_component(seed, "text_encoder")
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.text_width,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_width // CHANNELS_PER_HEAD,
            intermediate_size=size.text_width * 4,
        )
    )
    seed_component(seed, "text_encoder_2")
    text_encoder_2 = build_t5_encoder(tokenizer_2, size.wide_text_width, size.text_layers)
    seed_component(seed, "transformer")
    transformer = HunyuanDiT2DModel(
        num_attention_heads=size.dit_width // CHANNELS_PER_HEAD,
        attention_head_dim=CHANNELS_PER_HEAD,
        hidden_size=size.dit_width,
        in_channels=4,
        patch_size=2,
        sample_size=size.sample_size,
        num_layers=size.dit_layers,
        learn_sigma=True,  # the real model predicts a variance too; the pipeline drops it
        cross_attention_dim=size.text_width,  # BERT states
        cross_attention_dim_t5=size.wide_text_width,  # mT5 states, attention-pooled for the pooled projection
        pooled_projection_dim=size.text_width,
        text_len=77,  # the pipeline pads BERT tokens to 77
        text_len_t5=256,  # and mT5 tokens to 256
        use_style_cond_and_image_meta_size=True,  # v1.0/v1.1 layout, the diffusers default
    )
    seed_component(seed, "vae")
    # Hunyuan-DiT uses the SDXL VAE in its fp16-fix variant, which needs no float32 upcast.
    vae = build_vae(size, latent_channels=4, scaling_factor=0.13025, force_upcast=False)
    # Tencent-Hunyuan/HunyuanDiT-Diffusers scheduler: DDPM over 1000 steps, scaled_linear 0.00085-0.03,
    # v-prediction, "leading" spacing with offset 1.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.03,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return HunyuanDiTPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
