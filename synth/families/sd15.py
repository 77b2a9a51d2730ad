"""Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5): a UNet with one CLIP-L text encoder."""

from __future__ import annotations

from synth.families.base import Family


class SD15(Family):
    name = "sd15"
    text2img = "diffusers:StableDiffusionPipeline"
    img2img = "diffusers:StableDiffusionImg2ImgPipeline"
    controlnet_img2img = "diffusers:StableDiffusionControlNetImg2ImgPipeline"
    single_file = True
    objective = "synth.train.objectives:SD15"
    twin_builder = "synth.twins:_build_sd15"
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
