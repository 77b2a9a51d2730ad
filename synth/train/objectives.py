"""The machinery of training objectives: noise prediction on a discrete schedule and rectified flow matching.

Each family's objective (how its captions are encoded and how its denoiser is called) subclasses one of these
in the family's own module (synth/families/<family>.py, `Family.objective`). All randomness comes from the
generator a step passes in, so a step's noise and timesteps depend only on (seed, step), and a resumed run
draws the same numbers as an uninterrupted one.

torch is imported inside the methods: the family modules subclass these classes at import time, and the input
checks import the family modules before torch is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:
    import torch

TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32 (fp16 squares overflow)."""
    import torch.nn.functional as F

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
        import torch

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
        import torch

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

    def encode_text(self, prompts: list[tuple[str, ...]], device) -> dict:
        """The denoiser's text conditioning for a batch of captions (one per text encoder); the family's."""
        raise NotImplementedError

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        """The denoiser's output for noisy latents at timesteps; the family's."""
        raise NotImplementedError


class FlowMatching(NoisePrediction):
    """Rectified flow matching with shifted timesteps and SD3's loss weightings (Esser et al., 2024).

    After diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, with sigmas shifted in closed form:
    sigma = shift * u / (1 + (shift - 1) * u), the same map FlowMatchEulerDiscreteScheduler applies. The target
    is the velocity noise - latents; `predict` gets timesteps as sigma * 1000, as the flow pipelines pass them.
    """

    def __init__(self, pipe, objective: DictConfig):
        self.pipe = pipe
        self.cfg = objective
        self.shift = float(objective.shift if objective.shift is not None else pipe.scheduler.config.get("shift", 1.0))

    def loss(self, denoiser, latents, cond, batch, generator):
        import torch
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
        prediction = self.predict(denoiser, noisy, (sigmas * 1000).to(latents), cond, batch)
        weighting = compute_loss_weighting_for_sd3(self.cfg.loss_weighting, sigmas).to(latents.device)
        return weighting.float() * per_sample_mse(prediction, noise - latents)


def make_objective(family, pipe, objective: DictConfig):
    """The family's objective (Family.objective names its class) for pipe."""
    return family.objective_class()(pipe, objective)
