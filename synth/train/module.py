"""The LightningModule that trains a LoRA on a diffusers pipeline's denoiser.

Only the LoRA weights are trainable and only they go into checkpoints (with the optimizer, scheduler, loop
and data-loader state), so a checkpoint is small and a resume is exact. Each step draws its noise from a
generator seeded with (seed, epoch, batch index, rank).
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from synth.train.lora import add_lora, lora_state_dict

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite (a ValueError, so train.py reports it in one line)."""


class LoRAModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, pipe, family, objective, weight_dtype: torch.dtype):
        super().__init__()
        self.cfg, self.family, self.objective = cfg, family, objective
        self.pipe = pipe  # not an nn.Module: its frozen encoders are moved by hand in on_fit_start
        self.denoiser = getattr(pipe, family.denoiser)
        self.weight_dtype = weight_dtype  # the frozen weights' dtype (LoRA weights are fp32): run.weight_dtype_name
        self.lora_params = add_lora(self.denoiser, cfg.lora, family)
        self.denoiser.train()  # from_pretrained leaves models in eval mode; LoRA dropout needs train mode
        if cfg.gradient_checkpointing:
            if not getattr(self.denoiser, "_supports_gradient_checkpointing", False):
                raise ValueError(f"gradient_checkpointing=true: the {family.name} denoiser does not support it")
            self.denoiser.enable_gradient_checkpointing()
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        self.run_signature: dict | None = None  # set by fit(): goes into every checkpoint (resume.py checks it)
        self.cache = None
        if cfg.data.cache:
            from synth.train.cache import EncodingCache

            self.cache = EncodingCache(cfg.data.cache_dir)

    # Devices ------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.pipe.vae.to(dtype=self.objective_vae_dtype())
        self.encoders_to(self.device)
        if self.cache is not None:
            data = self.trainer.datamodule
            self.cache.fill(data.dataset, data.cache_keys, data.buckets, self.objective, self.device)
            self.encoders_to("cpu")  # training reads the cache; validation brings them back while it runs

    def encoders_to(self, device) -> None:
        """Move the frozen VAE and text encoders (the pipeline's non-denoiser models)."""
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(device)

    def objective_vae_dtype(self) -> torch.dtype:
        from synth.pipelines import DTYPES

        return DTYPES[self.cfg.vae_dtype]

    # Training -----------------------------------------------------------------------------------
    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Noise and timesteps for this batch depend on (seed, epoch, batch, rank) only: resumes draw the same."""
        key = (int(self.cfg.seed), self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator("cpu").manual_seed(hash(key) & 0x7FFFFFFFFFFFFFFF)

    @torch.no_grad()
    def encode(self, batch: dict, generator: torch.Generator):
        if self.cache is not None:
            mean, std, cond = self.cache.load(batch["cache_key"], self.device)
            return self.objective.sample_latents(mean, std, generator), cond
        latents = self.objective.encode_images(batch["pixels"], generator)
        cond = self.objective.encode_text(batch["prompts"], self.device)
        return latents.to(self.device), cond

    def training_step(self, batch: dict, batch_idx: int):
        generator = self.step_generator(batch_idx)
        latents, cond = self.encode(batch, generator)
        latents = latents.to(self.weight_dtype)
        loss = self.objective.loss(self.denoiser, latents, cond, batch, generator).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}); "
                "lower optim.lr, set trainer.gradient_clip_val, or use trainer.precision=bf16-mixed / "
                "vae_dtype=fp32 (fp16 overflows in some VAEs, e.g. Kolors')"
            )
        loader = self.trainer.datamodule.loader if self.trainer.datamodule is not None else None
        if loader is not None:
            loader.consumed += 1
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["prompts"]))
        return loss

    # Optimizer ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = instantiate(self.cfg.optim.optimizer)(params=self.lora_params)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 10**9
        scheduler = instantiate(self.cfg.optim.lr_scheduler)(optimizer=optimizer, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Checkpoints: the LoRA weights only, what the run was, and the global RNG ---------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {f"lora.{k}": v for k, v in lora_state_dict(self.denoiser).items()}
        # What a resume must match (model, LoRA shape, dataset): checked before the model loads (resume.py).
        checkpoint["synth"] = dict(self.run_signature or {})
        # LoRA dropout draws from the global RNG, which Lightning does not checkpoint: without it a
        # continued run would drop other units than one longer run.
        checkpoint["synth_rng"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["synth_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from peft import set_peft_model_state_dict

        state = {k.removeprefix("lora."): v for k, v in checkpoint["state_dict"].items() if k.startswith("lora.")}
        set_peft_model_state_dict(self.denoiser, state, adapter_name="default")
        checkpoint["state_dict"] = {}
        rng = checkpoint.get("synth_rng") or {}
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
