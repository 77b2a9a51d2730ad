"""Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5): a UNet with one CLIP-L text encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from synth.families.base import Family
from synth.train.objectives import NoisePrediction

if TYPE_CHECKING:
    from pathlib import Path

    from synth.twin_parts import TwinSize


class SD15(Family):
    name = "sd15"
    text2img = "diffusers:StableDiffusionPipeline"
    img2img = "diffusers:StableDiffusionImg2ImgPipeline"
    controlnet_img2img = "diffusers:StableDiffusionControlNetImg2ImgPipeline"
    single_file = True
    objective = "synth.families.sd15:Objective"
    twin_builder = "synth.families.sd15:build_twin"
    textual_inversion_targets = (("tokenizer", "text_encoder", "clip_l"),)

    def encode_prompt(self, pipe, prompt, negative, guidance, model_cfg) -> dict:
        """The CLIP-L final hidden state (StableDiffusionPipeline.encode_prompt, with chunks)."""
        from synth.prompt_encoding import chunk_count, encode_clip
        from synth.textual_inversion import expand

        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        prompt, negative = expand(prompt, tokenizer), expand(negative, tokenizer)
        count = chunk_count(tokenizer, prompt, negative) if guidance else chunk_count(tokenizer, prompt)
        call = {"prompt_embeds": encode_clip(tokenizer, encoder, prompt, count, None)[0]}
        if guidance:
            call["negative_prompt_embeds"] = encode_clip(tokenizer, encoder, negative, count, None)[0]
        return call

    # LoRA import
    kohya_in_diffusers = True  # diffusers' StableDiffusionLoraLoaderMixin converts lora_unet_/lora_te_ files
    lora_markers = ("lora_te_text_model", "text_encoder.text_model")

    # LoRA export
    ss_base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"


# --- the training objective (synth/train/objectives.py holds the machinery) ---


class Objective(NoisePrediction):
    """SD1.5: CLIP-L hidden states as cross-attention context."""

    def encode_text(self, prompts: list[tuple[str, ...]], device) -> dict:
        embeds, _ = self.pipe.encode_prompt([p[0] for p in prompts], device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        context = cond["encoder_hidden_states"].to(noisy.dtype)
        return denoiser(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]


# --- the offline twin (synth.twins builds and caches it; the parts are synth.twin_parts) ---


def build_twin(size: TwinSize, seed: int, scratch: Path):
    """SD1.5: CLIP-L, four-block UNet with attention in the top three, PNDM."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from synth.twin_parts import (
        CHANNELS_PER_HEAD,
        build_clip_text_encoder,
        build_clip_tokenizer,
        build_vae,
        seed_component,
    )

    tokenizer = build_clip_tokenizer(scratch / "tokenizer")
    seed_component(seed, "text_encoder")
    text_encoder = build_clip_text_encoder(tokenizer, size.text_width, size.text_layers, big=False, with_projection=False)
    seed_component(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=size.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        attention_head_dim=tuple(c // CHANNELS_PER_HEAD for c in size.unet_channels),
        cross_attention_dim=size.text_width,
    )
    seed_component(seed, "vae")
    vae = build_vae(size, latent_channels=4, scaling_factor=0.18215)  # SD1.x VAE scaling
    # runwayml/stable-diffusion-v1-5 scheduler: scaled_linear 0.00085-0.012 over 1000 steps,
    # PRK warm-up skipped, final alpha not forced to 1, timesteps offset by one.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,  # its CLIP vision model would dwarf the twin and has no offline stand-in
        feature_extractor=None,
        requires_safety_checker=False,
    )
