"""Training objectives per family: how captions and images are encoded, how noise is added, what the loss is.

One class per family; each says where its recipe comes from. All randomness comes from the generator a
step passes in, so a step's noise and timesteps depend only on (seed, step), and a resumed run draws the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32 (fp16 squares overflow)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, target.ndim)))


class NoisePrediction:
    """DDPM noise (epsilon) or v prediction on the family's discrete schedule (Ho et al., 2020; Salimans & Ho, 2022).

    The schedule comes from the weights' scheduler config, so Kolors trains on its 1100 steps and Hunyuan-DiT
    on its v-prediction DDPM schedule. After diffusers' examples/text_to_image/train_text_to_image_lora.py.
    """

    num_text_encoders = 1

    def __init__(self, pipe, objective: DictConfig):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.cfg = objective
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = objective.prediction_type or self.scheduler.config.prediction_type
        self.scheduler.register_to_config(prediction_type=self.prediction_type)

    # Images -------------------------------------------------------------------------------------
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> the VAE posterior's mean and standard deviation (what the latent cache stores)."""
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents sampled from the posterior with generator."""
        config = self.pipe.vae.config
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean)
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mean + std * noise - shift) * config.scaling_factor

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents, sampled from the VAE posterior with generator."""
        return self.sample_latents(*self.posterior(pixels), generator)

    # Loss ---------------------------------------------------------------------------------------
    def loss(self, denoiser, latents, cond: dict, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss of one batch."""
        batch_size, channels = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.cfg.noise_offset:
            # Offset noise (Guttenberg, 2023): lets the model learn very dark and very bright images.
            offset = torch.randn((batch_size, channels, 1, 1), generator=generator).to(latents)
            noise = noise + self.cfg.noise_offset * offset
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch_size,), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        prediction = self.predict(denoiser, noisy, timesteps, cond, batch)
        loss = per_sample_mse(prediction, target)
        if self.cfg.snr_gamma:
            # Min-SNR-gamma weighting (Hang et al., 2023), as in diffusers' training examples.
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, timesteps.cpu()).to(loss.device)
            clipped = torch.clamp(snr, max=float(self.cfg.snr_gamma))
            loss = loss * (clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1))
        return loss

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        raise NotImplementedError


class SD15(NoisePrediction):
    """SD1.5: CLIP-L hidden states as cross-attention context."""

    def encode_text(self, prompts: list[tuple[str, ...]], device) -> dict:
        embeds, _ = self.pipe.encode_prompt([p[0] for p in prompts], device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        context = cond["encoder_hidden_states"].to(noisy.dtype)
        return denoiser(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]


def size_crop_ids(batch: dict) -> torch.Tensor:
    """SDXL micro-conditioning per sample: original (h, w), crop top-left (y, x), target (h, w)."""
    return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()


class SDXL(NoisePrediction):
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


class Kolors(SDXL):
    """Kolors: SDXL's UNet conditioned on ChatGLM3, 1100 training steps; its VAE overflows in fp16 (use fp32/bf16)."""

    num_text_encoders = 1

    def encode_text(self, prompts, device) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            [p[0] for p in prompts], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}


class HunyuanDiT(NoisePrediction):
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


class SD3(NoisePrediction):
    """SD3: rectified flow matching with shifted timesteps and SD3's loss weightings (Esser et al., 2024).

    After diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, with sigmas shifted in closed form:
    sigma = shift * u / (1 + (shift - 1) * u), the same map FlowMatchEulerDiscreteScheduler applies.
    """

    num_text_encoders = 3

    def __init__(self, pipe, objective: DictConfig):
        self.pipe = pipe
        self.cfg = objective
        self.shift = float(objective.shift if objective.shift is not None else pipe.scheduler.config.get("shift", 1.0))

    def encode_text(self, prompts, device) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[p[0] for p in prompts], prompt_2=[p[1] for p in prompts], prompt_3=[p[2] for p in prompts],
            device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=int(self.cfg.get("max_sequence_length") or 256),
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def loss(self, denoiser, latents, cond, batch, generator):
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        batch_size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.cfg.timestep_sampling,
            batch_size=batch_size,
            logit_mean=float(self.cfg.logit_mean),
            logit_std=float(self.cfg.logit_std),
            mode_scale=float(self.cfg.mode_scale),
            generator=generator,
        ).to(latents.device)
        sigmas = self.shift * u / (1 + (self.shift - 1) * u)
        sigmas_4d = sigmas.view(-1, 1, 1, 1).to(latents)
        noisy = (1.0 - sigmas_4d) * latents + sigmas_4d * noise
        prediction = denoiser(
            hidden_states=noisy,
            timestep=(sigmas * 1000).to(latents),
            encoder_hidden_states=cond["encoder_hidden_states"].to(latents.dtype),
            pooled_projections=cond["pooled_projections"].to(latents.dtype),
            return_dict=False,
        )[0]
        weighting = compute_loss_weighting_for_sd3(self.cfg.loss_weighting, sigmas).to(latents.device)
        return weighting.float() * per_sample_mse(prediction, noise - latents)


def make_objective(family, pipe, objective: DictConfig):
    """The family's objective (Family.objective names its class) for pipe."""
    return family.objective_class()(pipe, objective)
