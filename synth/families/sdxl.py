"""Stable Diffusion XL (stabilityai/stable-diffusion-xl-base-1.0; SDXL-Turbo is conf/model/sdxl_turbo.yaml):
a UNet with CLIP-L and CLIP-G text encoders and size conditioning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from synth.families.base import Family
from synth.train.objectives import NoisePrediction

CLIP_L_AND_G = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))

if TYPE_CHECKING:
    from pathlib import Path

    from synth.twin_parts import TwinSize


class SDXL(Family):
    name = "sdxl"
    text2img = "diffusers:StableDiffusionXLPipeline"
    img2img = "diffusers:StableDiffusionXLImg2ImgPipeline"
    controlnet_img2img = "diffusers:StableDiffusionXLControlNetImg2ImgPipeline"
    single_file = True
    objective = "synth.families.sdxl:Objective"
    twin_builder = "synth.families.sdxl:build_twin"
    textual_inversion_targets = CLIP_L_AND_G

    def encode_prompt(self, pipe, prompt, negative, guidance, model_cfg) -> dict:
        """CLIP-L ++ CLIP-G penultimate states, CLIP-G pooled (StableDiffusionXLPipeline.encode_prompt, with chunks)."""
        import torch

        from synth.prompt_encoding import clip_texts, count_chunks, two_clips

        positive, negative_texts = clip_texts(pipe, prompt), clip_texts(pipe, negative)
        count = count_chunks(pipe, positive, negative_texts) if guidance else count_chunks(pipe, positive)
        embeds, pooled = two_clips(pipe, positive, count)
        call = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guidance:
            if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
                # SDXL was trained with zeroed embeddings for an empty prompt; diffusers does the same.
                call["negative_prompt_embeds"] = torch.zeros_like(embeds)
                call["negative_pooled_prompt_embeds"] = torch.zeros_like(pooled)
            else:
                call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"] = two_clips(
                    pipe, negative_texts, count)
        return call

    def check_embedding(self, embedding) -> None:
        if set(embedding.vectors) != {"clip_l", "clip_g"}:
            raise ValueError(
                f"textual_inversion={embedding.path}: SDXL needs an embedding with clip_l and clip_g vectors; "
                f"this file has {', '.join(embedding.vectors)} (an SD1.x embedding?)"
            )

    # LoRA export
    ss_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"


# --- the training objective (synth/train/objectives.py holds the machinery) ---


def size_crop_ids(batch: dict):
    """SDXL micro-conditioning per sample: original (h, w), crop top-left (y, x), target (h, w)."""
    import torch

    return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()


class Objective(NoisePrediction):
    """SDXL: CLIP-L + OpenCLIP-G context, pooled G embedding and size/crop ids (Podell et al., 2023)."""

    num_text_encoders = 2

    def encode_text(self, prompts, device) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[p[0] for p in prompts], prompt_2=[p[1] for p in prompts], device=device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        added = {"text_embeds": cond["text_embeds"].to(noisy.dtype), "time_ids": size_crop_ids(batch).to(noisy)}
        context = cond["encoder_hidden_states"].to(noisy.dtype)
        return denoiser(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]


# --- the offline twin (synth.twins builds and caches it; the parts are synth.twin_parts) ---


def build_twin(size: TwinSize, seed: int, scratch: Path):
    """SDXL (and SDXL-Turbo): CLIP-L + OpenCLIP-G with projection, text_time UNet, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from synth.twin_parts import (
        _clip_text_encoder,
        _clip_tokenizer,
        _sdxl_unet,
        _seed,
        _vae,
    )

    tokenizer = _clip_tokenizer(scratch / "tokenizer")
    tokenizer_2 = _clip_tokenizer(scratch / "tokenizer_2", pad_token="!")
    _seed(seed, "text_encoder")
    text_encoder = _clip_text_encoder(tokenizer, size.text_width, size.text_layers, big=False, with_projection=False)
    _seed(seed, "text_encoder_2")
    text_encoder_2 = _clip_text_encoder(
        tokenizer_2, size.wide_text_width, size.text_layers, big=True, with_projection=True
    )
    _seed(seed, "unet")
    unet = _sdxl_unet(
        size, cross_attention_dim=size.text_width + size.wide_text_width, pooled_dim=size.wide_text_width
    )
    _seed(seed, "vae")
    vae = _vae(size, latent_channels=4, scaling_factor=0.13025, force_upcast=True)  # SDXL VAE overflows in fp16
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler: scaled_linear 0.00085-0.012, "leading" spacing, offset 1.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
