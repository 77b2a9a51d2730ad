"""Lightning callbacks and plugins: checkpoints a run continues from exactly (written atomically), the LoRA
file at every checkpoint, and validation images beside the base model's."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from synth.config import parse_size

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that the run's last step is saved like every periodic checkpoint.

    The gap it fills: ModelCheckpoint writes a run's final last.ckpt from on_train_epoch_end / on_train_end,
    after max_steps has closed the epoch loop. That state says "epoch finished", so a run continued from it
    (ckpt_path=<run> trainer.max_steps=<more>) starts a new epoch: another batch order and other noise than
    one longer run, which goes on with the same epoch. Saving at the end of the last batch, where periodic
    checkpoints are saved, records the run as it is, so continuing it is exact.
    """

    @staticmethod
    def _at_max_steps(trainer) -> bool:
        return trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._at_max_steps(trainer) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)  # checkpoints/step-N.ckpt, as a periodic save
            self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._at_max_steps(trainer):  # at max_steps the batch end above has saved this step
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not (self._at_max_steps(trainer) and self._last_global_step_saved == trainer.global_step):
            super().on_train_end(trainer, pl_module)


class LoRAExport(L.Callback):
    """At every checkpoint save, also write the LoRA alone as <dirpath>/step-NNNNNN.safetensors."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.last_step = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # step-N.ckpt and last.ckpt are saved at the same step: one LoRA file for both.
        if trainer.is_global_zero and trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            from synth.train.lora import export_lora

            path = self.dirpath / f"step-{trainer.global_step:06d}.safetensors"
            export_lora(path, pl_module.denoiser, pl_module.cfg, pl_module.family)
            log.info("LoRA at step %d: %s", trainer.global_step, path)


class ValidationImages(L.Callback):
    """Every N steps, images at fixed prompts and seeds with the LoRA, and (once) the base model's beside them.

    Saved under <dirpath>/step-NNNNNN/ and logged as val/image to a W&B logger.
    """

    def __init__(self, dirpath, every_n_steps, prompts, seeds, num_inference_steps=None, guidance_scale=None,
                 size=None, compare_base=True):
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.size, self.compare_base = size, compare_base
        self.base_images: list | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if trainer.fit_loop._should_accumulate():
            return  # mid-accumulation: the optimizer has not stepped yet
        self.run(trainer, pl_module, step)

    @torch.no_grad()
    def generate(self, pl_module) -> list:
        cfg, family, pipe = pl_module.cfg, pl_module.family, pl_module.pipe
        model = cfg.model
        width, height = parse_size(self.size if self.size is not None else cfg.data.size, model.native_size)
        steps = self.num_inference_steps or model.num_inference_steps
        guidance = self.guidance_scale if self.guidance_scale is not None else model.guidance_scale
        images = []
        for prompt in self.prompts:
            for seed in self.seeds:
                images.append(
                    pipe(
                        prompt=prompt,
                        num_inference_steps=int(steps),
                        guidance_scale=float(guidance),
                        generator=torch.Generator("cpu").manual_seed(int(seed)),
                        **family.call_kwargs(model, "text2img", width, height),
                    ).images[0]
                )
        return images

    def run(self, trainer, pl_module, step: int) -> None:
        from diffusers.utils.peft_utils import set_adapter_layers

        pipe, denoiser = pl_module.pipe, pl_module.denoiser
        pipe.set_progress_bar_config(disable=True)
        was_training = denoiser.training
        denoiser.eval()
        pl_module.encoders_to(pl_module.device)  # back from host memory when the latent cache sent them there
        # Half-precision frozen weights meet an fp32 VAE and fp32 LoRA layers: autocast reconciles them.
        half = pl_module.weight_dtype if pl_module.weight_dtype != torch.float32 else None
        autocast = torch.autocast(pl_module.device.type, dtype=half, enabled=half is not None)
        try:
            with autocast:
                images = self.generate(pl_module)
                if self.compare_base and self.base_images is None:
                    set_adapter_layers(denoiser, enabled=False)
                    try:
                        self.base_images = self.generate(pl_module)
                    finally:
                        set_adapter_layers(denoiser, enabled=True)
        finally:
            denoiser.train(was_training)
            if pl_module.cache is not None:
                pl_module.encoders_to("cpu")
        folder = self.dirpath / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        captions = [f"{prompt} (seed {seed})" for prompt in self.prompts for seed in self.seeds]
        logged, logged_captions = [], []
        for index, (image, caption) in enumerate(zip(images, captions)):
            image.save(folder / f"{index:02d}-lora.png")
            logged.append(image)
            logged_captions.append(f"lora: {caption}")
            if self.base_images is not None:
                self.base_images[index].save(folder / f"{index:02d}-base.png")
                logged.append(self.base_images[index])
                logged_captions.append(f"base: {caption}")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/image", images=logged, caption=logged_captions, step=step)
        log.info("validation images at step %d: %s", step, folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a hidden temp file beside the target and renamed into place.

    The gap: Lightning's local save goes through fsspec, which writes to the system temp folder and moves
    the file over, a copy (not atomic) when /tmp is another file system; a kill mid-copy leaves a truncated
    last.ckpt. Here a kill leaves only checkpoints/.last.ckpt.* (removed at the next start)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from synth.train.run_folder import umask_mode

        if storage_options is not None:
            raise TypeError("storage_options is not supported")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(scratch, umask_mode())
            os.replace(scratch, path)
        finally:
            Path(scratch).unlink(missing_ok=True)
