"""Stable Diffusion XL (stabilityai/stable-diffusion-xl-base-1.0; SDXL-Turbo is conf/model/sdxl_turbo.yaml):
a UNet with CLIP-L and CLIP-G text encoders and size conditioning."""

from __future__ import annotations

import re
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

    # LoRA import
    kohya_in_diffusers = True  # diffusers' StableDiffusionXLLoraLoaderMixin converts kohya files, SGM names too
    lora_markers = ("lora_te1_", "lora_te2_", "text_encoder_2.", "input_blocks_", "label_emb")  # SGM names: kohya SDXL

    @property
    def lora_prefixes(self):
        return (*super().lora_prefixes, ("text_encoder_2.", "text_encoder_2"), ("lora_te2_", "text_encoder_2"))

    def lora_module_targets(self, component, name, underscored, model):
        """kohya trains SDXL on the SGM UNet: its input_blocks/middle_block/output_blocks names become diffusers'
        down_blocks/mid_block/up_blocks ones (sgm_to_diffusers)."""
        if underscored and component == self.denoiser:
            return [(sgm_to_diffusers(name, model), 0, 1)]
        return [(name, 0, 1)]

    # LoRA export
    ss_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"


# --- LoRA import: kohya's SGM UNet names ---

SGM_RESNET_LAYERS = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
                     "skip_connection": "conv_shortcut"}
SGM_TOP_LAYERS = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
                  "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
                  "input_blocks_0_0": "conv_in", "out_2": "conv_out"}


def sgm_to_diffusers(name: str, unet) -> str:
    """A kohya layer name of the SGM UNet (input_blocks_4_1_proj_in) as diffusers names it
    (down_blocks_1_attentions_0_proj_in), from the UNet's layers_per_block; other names are returned as they are.
    input block i >= 1 is down block (i-1) // (n+1), layer (i-1) % (n+1), the last of which is the downsampler;
    output block i is up block i // (n+1), layer i % (n+1), with the upsampler after the attention if any."""
    for sgm, diffusers_name in SGM_TOP_LAYERS.items():
        if name == sgm:
            return diffusers_name
    match = (re.fullmatch(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)", name)
             or re.fullmatch(r"(middle_block)_(\d+)_()(.+)", name))
    if match is None:
        return name
    blocks, index, inner, rest = match.group(1), int(match.group(2)), int(match.group(3) or 0), match.group(4)
    per_block = unet.config.layers_per_block
    if blocks == "middle_block":
        place = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(index)
        head = f"mid_block_{place}"
    elif blocks == "input_blocks":
        block, layer = (index - 1) // (per_block + 1), (index - 1) % (per_block + 1)
        if layer == per_block:
            return f"down_blocks_{block}_downsamplers_0_{rest.replace('op', 'conv')}"
        head = f"down_blocks_{block}_{'resnets' if inner == 0 else 'attentions'}_{layer}"
    else:
        block, layer = index // (per_block + 1), index % (per_block + 1)
        has_attention = hasattr(unet.up_blocks[block], "attentions") if block < len(unet.up_blocks) else False
        if inner == 0:
            head = f"up_blocks_{block}_resnets_{layer}"
        elif inner == 1 and has_attention:
            head = f"up_blocks_{block}_attentions_{layer}"
        else:
            return f"up_blocks_{block}_upsamplers_0_{rest}"
    if "resnets" in head:
        rest = SGM_RESNET_LAYERS.get(rest, rest)
    return f"{head}_{rest}"



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
        build_clip_text_encoder,
        build_clip_tokenizer,
        build_sdxl_unet,
        build_vae,
        seed_component,
    )

    tokenizer = build_clip_tokenizer(scratch / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(scratch / "tokenizer_2", pad_token="!")
    seed_component(seed, "text_encoder")
    text_encoder = build_clip_text_encoder(tokenizer, size.text_width, size.text_layers, big=False, with_projection=False)
    seed_component(seed, "text_encoder_2")
    text_encoder_2 = build_clip_text_encoder(
        tokenizer_2, size.wide_text_width, size.text_layers, big=True, with_projection=True
    )
    seed_component(seed, "unet")
    unet = build_sdxl_unet(
        size, cross_attention_dim=size.text_width + size.wide_text_width, pooled_dim=size.wide_text_width
    )
    seed_component(seed, "vae")
    vae = build_vae(size, latent_channels=4, scaling_factor=0.13025, force_upcast=True)  # SDXL VAE overflows in fp16
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
