"""Kolors (Kwai-Kolors/Kolors-diffusers): an SDXL-shaped UNet with a ChatGLM3 text encoder."""

from __future__ import annotations

from synth.families.base import Family


class Kolors(Family):
    name = "kolors"
    text2img = "diffusers:KolorsPipeline"
    img2img = "diffusers:KolorsImg2ImgPipeline"
    objective = "synth.train.objectives:Kolors"
    twin_builder = "synth.twins:_build_kolors"
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
