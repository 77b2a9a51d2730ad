"""Kolors (Kwai-Kolors/Kolors-diffusers): an SDXL-shaped UNet with a ChatGLM3 text encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from synth.families.base import Family
from synth.families.sdxl import Objective as SDXLObjective
from synth.families.sdxl import sgm_to_diffusers

if TYPE_CHECKING:
    from pathlib import Path

    from synth.twin_parts import TwinSize


class Kolors(Family):
    name = "kolors"
    text2img = "diffusers:KolorsPipeline"
    img2img = "diffusers:KolorsImg2ImgPipeline"
    objective = "synth.families.kolors:Objective"
    twin_builder = "synth.families.kolors:build_twin"
    max_sequence_length_limit = 256  # ChatGLM's, as KolorsPipeline takes it

    def encode_prompt(self, pipe, prompt, negative, guidance, model_cfg) -> dict:
        """Kolors reads the text itself (ChatGLM, up to model.max_sequence_length <= 256 tokens)."""
        from synth.prompt_encoding import plain_text

        call = {"prompt": plain_text(prompt), "negative_prompt": plain_text(negative) or None}
        if model_cfg.get("max_sequence_length") is not None:
            call["max_sequence_length"] = int(model_cfg.max_sequence_length)
        return call

    def check_train(self, cfg) -> None:
        if cfg.vae_dtype == "fp16":
            raise ValueError("vae_dtype=fp16: Kolors' VAE overflows to NaN in fp16; use vae_dtype=fp32 or bf16")

    # LoRA import
    lora_markers = ("query_key_value", "dense_h_to_4h", "dense_4h_to_h")  # ChatGLM3 text-encoder layers

    def lora_module_targets(self, component, name, underscored, model):
        """Kolors' UNet is SDXL's: kohya files name its SGM blocks as for SDXL."""
        if underscored and component == self.denoiser:
            return [(sgm_to_diffusers(name, model), 0, 1)]
        return [(name, 0, 1)]

    # LoRA export
    ss_base_model_version = "kolors"  # sd-scripts has no Kolors trainer: the family name
    modelspec_architecture = "kolors"


# --- the training objective (synth/train/objectives.py holds the machinery) ---


class Objective(SDXLObjective):
    """Kolors: SDXL's UNet conditioned on ChatGLM3, 1100 training steps; its VAE overflows in fp16 (use fp32/bf16)."""

    num_text_encoders = 1

    def encode_text(self, prompts, device) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            [p[0] for p in prompts], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}


# --- the offline twin (synth.twins builds and caches it; the parts are synth.twin_parts) ---


def chatglm_encoder(tokenizer, size: TwinSize):
    """Builds Kolors' ChatGLM3-style text encoder with explicit, seeded weights."""
    import math

    import torch
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    from synth.twin_parts import CHANNELS_PER_HEAD

    heads = size.text_width // CHANNELS_PER_HEAD
    config = ChatGLMConfig(
        num_layers=size.text_layers,
        # SentencePiece pieces + ChatGLM's nine special tokens, rounded up to 64 like the real 65024.
        padded_vocab_size=math.ceil(tokenizer.vocab_size / 64) * 64,
        hidden_size=size.text_width,
        ffn_hidden_size=size.text_width * 2,
        kv_channels=CHANNELS_PER_HEAD,
        num_attention_heads=heads,
        seq_length=256,  # Kolors never feeds more than 256 tokens; the rotary cache is built this long
        add_qkv_bias=True,  # ChatGLM3 has query/key/value biases and no other linear biases
        multi_query_attention=True,  # ChatGLM3 shares key/value heads between query heads
        multi_query_group_num=max(heads // 2, 1),
        original_rope=True,  # the attribute ChatGLMModel reads; Kolors' config sets it
    )
    # empty_init=True (the default) leaves weights as uninitialised memory, which gives NaN images.
    model = ChatGLMModel(config, empty_init=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name:
                parameter.fill_(1.0)  # RMSNorm gains are created with torch.empty
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(mean=0.0, std=0.02)  # GPT-style init
    return model


def build_twin(size: TwinSize, seed: int, scratch: Path):
    """Kolors: ChatGLM text encoder, SDXL-shaped UNet projecting ChatGLM states (text_proj), Euler."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    from synth.twin_parts import (
        build_chatglm_tokenizer,
        build_sdxl_unet,
        build_vae,
        seed_component,
    )

    tokenizer = build_chatglm_tokenizer(scratch / "tokenizer")
    seed_component(seed, "text_encoder")
    text_encoder = chatglm_encoder(tokenizer, size)
    seed_component(seed, "unet")
    unet = build_sdxl_unet(
        size,
        cross_attention_dim=size.wide_text_width,
        pooled_dim=size.text_width,  # the pooled embedding is ChatGLM's last hidden state at the last token
        encoder_hid_dim_type="text_proj",  # a linear layer maps ChatGLM states to cross_attention_dim
        encoder_hid_dim=size.text_width,
    )
    seed_component(seed, "vae")
    vae = build_vae(size, latent_channels=4, scaling_factor=0.13025, force_upcast=True)  # Kolors reuses the SDXL VAE
    # Kwai-Kolors/Kolors-diffusers scheduler: trained over 1100 steps with scaled_linear 0.00085-0.014,
    # "leading" spacing and offset 1, as in SDXL.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1100,
        beta_start=0.00085,
        beta_end=0.014,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
