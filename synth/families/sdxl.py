"""Stable Diffusion XL (stabilityai/stable-diffusion-xl-base-1.0; SDXL-Turbo is conf/model/sdxl_turbo.yaml):
a UNet with CLIP-L and CLIP-G text encoders and size conditioning."""

from __future__ import annotations

from synth.families.base import Family

CLIP_L_AND_G = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))


class SDXL(Family):
    name = "sdxl"
    text2img = "diffusers:StableDiffusionXLPipeline"
    img2img = "diffusers:StableDiffusionXLImg2ImgPipeline"
    controlnet_img2img = "diffusers:StableDiffusionXLControlNetImg2ImgPipeline"
    single_file = True
    objective = "synth.train.objectives:SDXL"
    twin_builder = "synth.twins:_build_sdxl"
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
