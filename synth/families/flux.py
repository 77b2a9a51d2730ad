"""FLUX.1 [dev] and [schnell] (black-forest-labs/FLUX.1-dev, FLUX.1-schnell): a rectified-flow transformer with
double-stream (MMDiT) and single-stream blocks over 2x2-packed latent tokens, rotary position ids (img_ids/txt_ids),
CLIP-L (pooled only) and T5-XXL text encoders, and a 16-channel VAE.

[dev] is guidance-distilled: `guidance_scale` feeds the transformer's guidance embedding (one pass per step, no
classifier-free guidance). A negative prompt needs FluxPipeline's true CFG (model.true_cfg_scale > 1: a second pass
per step); with true_cfg_scale 1 synth refuses a negative prompt instead of ignoring it. [schnell] has no guidance
embedder: guidance_scale does nothing there. Both are configs of this family (conf/model/flux_dev.yaml,
flux_schnell.yaml).

The pipelines return packed latents for output_type="latent"; `pipeline_latents` unpacks them for the high-res
chain, and the tiled forward unpacks the transformer's tokens into a grid so that each tile is cut, given the
position ids of its own rows and columns, and packed again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from synth.families.base import FLOW, Family
from synth.train.objectives import FlowMatching

if TYPE_CHECKING:
    from pathlib import Path

    from synth.twin_parts import TwinSize

PATCH = 2  # FLUX packs 2x2 latent pixels into one token


class Flux(Family):
    name = "flux"
    text2img = "diffusers:FluxPipeline"
    img2img = "diffusers:FluxImg2ImgPipeline"
    size_step = 16  # VAE factor 8 x the 2x2 packing (FluxPipeline's vae_scale_factor * 2)
    single_file = False  # diffusers reads BFL-format single files; synth cannot write one for the twins to test it
    denoiser = "transformer"
    prediction = FLOW
    objective = "synth.families.flux:Objective"
    tiled_forward = "synth.families.flux:tiled_forward"
    twin_builder = "synth.families.flux:build_twin"
    # add add_q_proj, add_k_proj, add_v_proj, to_add_out (text stream) or proj_mlp, proj_out to lora.target_modules
    textual_inversion_targets = (("tokenizer", "text_encoder", "clip_l"),)  # CLIP-L: SD1.x's embeddings fit
    max_sequence_length_limit = 512  # T5's, as FluxPipeline takes it
    untiled_limit_px = None  # rotary position ids have no table to run out of
    tile_step_reason = "the 2x2 token packing"
    clip_states_chunked = False  # CLIP-L gives only its pooled output: no chunks, no weights
    attention_dispatch = True  # FluxAttnProcessor calls diffusers' dispatch_attention_fn
    first_block_cache = True  # FluxTransformer2DModel is a CacheMixin; FluxPipeline sets cache contexts

    def call_kwargs(self, model_cfg, task, width, height) -> dict:
        # FluxImg2ImgPipeline defaults its size to the transformer's sample size, not the image's (like SD3's).
        return {"width": width, "height": height, "max_sequence_length": int(model_cfg.get("max_sequence_length", 512)),
                "true_cfg_scale": float(model_cfg.get("true_cfg_scale", 1.0))}

    def img2img_steps(self, steps: int, strength: float) -> int:
        # FluxImg2ImgPipeline skips int(steps - steps * strength) steps, as SD3's does.
        return steps - int(max(steps - steps * strength, 0))

    def check_model(self, cfg) -> None:
        """model.true_cfg_scale >= 1; a negative prompt only with true CFG (FluxPipeline ignores it at 1)."""
        scale = cfg.model.get("true_cfg_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale < float("inf"):
            raise ValueError(f"model.true_cfg_scale={scale}: must be a finite number >= 1 (1 = no true CFG)")
        if cfg.get("negative_prompt") and scale == 1:
            raise ValueError(f"negative_prompt={cfg.negative_prompt!r}: FLUX uses a negative prompt only with true "
                             "classifier-free guidance; set model.true_cfg_scale above 1 (e.g. 4.0, two passes per "
                             "step) or drop negative_prompt")

    def encode_prompt(self, pipe, prompt, negative, guidance, model_cfg) -> dict:
        """CLIP-L's pooled output and T5's states (FluxPipeline.encode_prompt). CLIP-L gives only its pooled
        output, of the first 77 tokens (synth's chunks would add nothing to it, and weights do not reach a pooled
        vector); both encoders read the text without weighting syntax, CLIP-L with textual-inversion keywords
        expanded. T5 keeps model.max_sequence_length (up to 512) tokens."""
        import torch

        from synth.prompt_encoding import plain_text
        from synth.textual_inversion import expand

        max_length = int(model_cfg.get("max_sequence_length", 512))
        device = pipe._execution_device

        def encode(text: str):
            with torch.no_grad():
                pooled = pipe._get_clip_prompt_embeds(prompt=plain_text(expand(text, pipe.tokenizer)), device=device)
                t5 = pipe._get_t5_prompt_embeds(prompt=plain_text(text), max_sequence_length=max_length, device=device)
            return t5, pooled

        call = dict(zip(("prompt_embeds", "pooled_prompt_embeds"), encode(prompt)))
        if float(model_cfg.get("true_cfg_scale", 1.0)) > 1 and negative:
            call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"] = encode(negative)
        return call

    def pipeline_latents(self, pipe, latents, width: int, height: int):
        """FluxPipeline's output_type="latent" is packed tokens (batch, tokens, 64): unpacked to (batch, 16, h, w)."""
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    # Forge writes FLUX's embedded guidance as "Distilled CFG Scale" and the true CFG as "CFG scale"
    a1111_guidance_fields = {"CFG scale": "model.true_cfg_scale", "Distilled CFG Scale": "guidance_scale"}

    # LoRA import (diffusers/peft files through diffusers' Flux loader; files with CLIP-L layers are merged by synth)
    lora_markers = ("double_blocks_", "single_blocks_", "single_transformer_blocks")  # BFL names: kohya's FLUX LoRAs

    # LoRA export
    lora_export_form = "diffusers_alpha"  # diffusers keys + per-module alpha: ComfyUI maps diffusers' Flux keys
    ss_base_model_version = "flux1"  # what sd-scripts' FLUX branch writes
    modelspec_architecture = "flux-1-dev"


def tiled_forward(model, original, settings, stats, hidden_states, *args, img_ids=None, **kwargs):
    """FluxTransformer2DModel.forward over tiles of the token grid, each tile with the img_ids of its own absolute
    rows and columns, so that RoPE sees where the tile sits in the whole image.

    The transformer takes one img_ids for its whole batch, so tiles at different places cannot share a call:
    each call carries one tile (with the pipeline's whole batch); highres.tile_batch_size does not batch them.
    """
    import torch

    from synth.tiled_denoiser import count_tiles, refuse_residuals, transformer_output
    from synth.tiling import tile_layout, tiled_apply

    refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    if img_ids.ndim == 3:  # diffusers' deprecated batched form
        img_ids = img_ids[0]
    rows, columns = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
    batch, _, channels = hidden_states.shape
    grid = hidden_states.reshape(batch, rows, columns, channels).permute(0, 3, 1, 2)  # tokens are row-major
    ids = img_ids.reshape(rows, columns, img_ids.shape[-1])
    tile, overlap = settings.tile_size // PATCH, settings.tile_overlap // PATCH  # latent pixels -> tokens
    tiles = tile_layout(rows, columns, tile, min(overlap, tile - 1))
    count_tiles(stats, tiles, 1)

    def run(chunk, crops):
        out = []
        for tile_, crop in zip(chunk, crops.chunk(len(chunk))):
            tokens = crop.permute(0, 2, 3, 1).reshape(batch, -1, channels)
            tile_ids = ids[(*tile_.slices(),)].reshape(-1, ids.shape[-1])
            pred = original(tokens, *args, img_ids=tile_ids, **kwargs, return_dict=False)[0]
            out.append(pred.reshape(batch, tile_.height, tile_.width, -1).permute(0, 3, 1, 2))
        return torch.cat(out)

    out = tiled_apply(run, grid, tiles, overlap, 1)
    return transformer_output(out.permute(0, 2, 3, 1).reshape(batch, rows * columns, -1), return_dict)


# --- the training objective (synth/train/objectives.py holds the machinery) ---


class Objective(FlowMatching):
    """FLUX: flow matching on packed latents, conditioned on T5 states and CLIP-L's pooled output, with the
    shifted logit-normal timesteps of diffusers' train_dreambooth_lora_flux.py (FlowMatching's, shift from the
    weights' scheduler: 3.0 for [dev]). [dev]'s guidance embedding gets objective.guidance_scale, as at inference."""

    num_text_encoders = 2

    def encode_text(self, prompts, device) -> dict:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=[p[0] for p in prompts], prompt_2=[p[1] for p in prompts], device=device, num_images_per_prompt=1,
            max_sequence_length=int(self.cfg.get("max_sequence_length") or 512),
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        import torch

        pipe = self.pipe
        size, (height, width) = noisy.shape[0], noisy.shape[-2:]
        packed = pipe._pack_latents(noisy, size, noisy.shape[1], height, width)
        img_ids = pipe._prepare_latent_image_ids(size, height // PATCH, width // PATCH, noisy.device, noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            scale = self.cfg.get("guidance_scale")  # conf/train.yaml: model.guidance_scale
            guidance = torch.full((size,), 3.5 if scale is None else float(scale), device=noisy.device,
                                  dtype=noisy.dtype)
        pred = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # the pipeline passes sigmas
            guidance=guidance,
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            pooled_projections=cond["pooled_projections"].to(noisy.dtype),
            txt_ids=cond["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(pred, height * scale, width * scale, scale)


# --- the offline twin (synth.twins builds and caches it; the parts are synth.twin_parts) ---


def build_twin(size: TwinSize, seed: int, scratch: Path, guidance_embeds: bool = True, dynamic_shifting: bool = True):
    """FLUX: CLIP-L (pooled) + T5, a transformer with double- and single-stream blocks over 2x2-packed tokens,
    16-channel VAE with FLUX's scale and shift, flow matching.

    guidance_embeds: [dev]'s guidance embedder ([schnell] has none); dynamic_shifting: [dev]'s resolution-dependent
    timestep shift (FluxPipeline passes mu); [schnell] runs unshifted.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

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
    tokenizer_2 = build_t5_tokenizer(scratch / "tokenizer_2", model_max_length=512)  # T5's context
    clip_width, t5_width = size.text_width, size.wide_text_width
    seed_component(seed, "text_encoder")
    text_encoder = build_clip_text_encoder(tokenizer, clip_width, size.text_layers, big=False, with_projection=False)
    seed_component(seed, "text_encoder_2")
    text_encoder_2 = build_t5_encoder(tokenizer_2, t5_width, size.text_layers)
    seed_component(seed, "transformer")
    # The real model: 19 double-stream and 38 single-stream blocks, heads of 128 channels split (16, 56, 56)
    # over the rotary axes (text index, row, column); here half the layers of each kind, heads of 16 as (4, 6, 6).
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * PATCH * PATCH,
        num_layers=size.dit_layers // 2,
        num_single_layers=size.dit_layers // 2,
        attention_head_dim=CHANNELS_PER_HEAD,
        num_attention_heads=size.dit_width // CHANNELS_PER_HEAD,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    seed_component(seed, "vae")
    # FLUX's VAE: 16 latent channels, its published scale and shift, no quant convs.
    vae = build_vae(size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False)
    if dynamic_shifting:  # black-forest-labs/FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    else:  # black-forest-labs/FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
