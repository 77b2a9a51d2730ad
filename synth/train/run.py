"""LoRA training from a composed config: `train(cfg)` is what `python train.py` runs."""

from __future__ import annotations

import errno
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from synth.accel import check_accel, check_train_accel
from synth.config import check_model_path, check_offline
from synth.families import FAMILIES, FLOW, get_family

log = logging.getLogger(__name__)

VAE_DTYPES = ("fp32", "bf16", "fp16")
PRECISION_DTYPES = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16": "fp16"}


def weight_dtype_name(cfg: DictConfig) -> str:
    """Frozen weights: weight_dtype, or with auto the half type trainer.precision computes in (fp32 otherwise)."""
    if cfg.weight_dtype != "auto":
        return cfg.weight_dtype
    return PRECISION_DTYPES.get(str(cfg.trainer.get("precision", "32")), "fp32")


def train_device(cfg: DictConfig) -> str:
    """The device type trainer.accelerator trains on (auto as Lightning picks it: cuda, else mps, else cpu)."""
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator in ("cpu", "mps"):
        return accelerator
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"


def resolve_ckpt_path(ckpt_path, output_dir: str) -> str | None:
    """ckpt_path: null, "last" (this run folder's checkpoints/last.ckpt), "auto" (the same if it exists, else a
    fresh start: for jobs that a cluster may requeue), a run folder, or a .ckpt file."""
    if ckpt_path is None:
        return None
    text = str(ckpt_path)
    if text == "auto":
        candidate = Path(output_dir) / "checkpoints" / "last.ckpt"
        return str(candidate) if candidate.is_file() else None
    if text == "last":
        candidate = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not candidate.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: no {candidate}; resume in the old run's folder (hydra.run.dir=<run folder> "
                "ckpt_path=last) or give ckpt_path=<run folder or .ckpt file>"
            )
        return str(candidate)
    path = Path(text).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        raise FileNotFoundError(f"ckpt_path={text}: folder holds no checkpoints/last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={text}: no such file")
    return str(path)


def check_train_inputs(cfg: DictConfig):
    """Validate a train config and read the dataset, before any model loads; returns the dataset items."""
    from synth.train.objectives import (
        LOSS_WEIGHTING,
        PREDICTION_TYPES,
        TIMESTEP_SAMPLING,
    )
    from synth.train.rows import check_data_config, load_dataset

    family = get_family(cfg.model.family)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed={cfg.seed}: must be an integer in [0, 2**63)")
    objective = cfg.objective
    if objective.timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"objective.timestep_sampling={objective.timestep_sampling}: choose one of {', '.join(TIMESTEP_SAMPLING)}")
    if objective.loss_weighting not in LOSS_WEIGHTING:
        raise ValueError(f"objective.loss_weighting={objective.loss_weighting}: choose one of {', '.join(LOSS_WEIGHTING)}")
    if objective.prediction_type is not None and objective.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"objective.prediction_type={objective.prediction_type}: choose null (the scheduler's) or one of "
            + ", ".join(PREDICTION_TYPES)
        )
    if family.prediction == FLOW and (objective.snr_gamma or objective.noise_offset or objective.prediction_type):
        noise = ", ".join(name for name, each in FAMILIES.items() if each.prediction != FLOW)
        raise ValueError(
            "objective.snr_gamma / noise_offset / prediction_type apply to noise-prediction families "
            f"({noise}), not {family.name}'s flow matching; use objective.loss_weighting"
        )
    if objective.snr_gamma is not None and objective.snr_gamma <= 0:
        raise ValueError(f"objective.snr_gamma={objective.snr_gamma}: must be > 0 (5.0 is the paper's), or null")
    if objective.shift is not None and objective.shift <= 0:
        raise ValueError(f"objective.shift={objective.shift}: must be > 0, or null for the scheduler's shift")
    if cfg.vae_dtype not in VAE_DTYPES:
        raise ValueError(f"vae_dtype={cfg.vae_dtype}: choose one of {', '.join(VAE_DTYPES)}")
    family.check_train(cfg)  # the family's own refusals (Kolors' fp16 VAE)
    check_train_accel(cfg)  # accel options training cannot take (fuse_qkv, cache), then the device's part
    if cfg.weight_dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"weight_dtype={cfg.weight_dtype}: choose one of auto, fp32, bf16, fp16")
    lora = cfg.lora
    if not isinstance(lora.rank, int) or lora.rank < 1:
        raise ValueError(f"lora.rank={lora.rank}: must be an integer >= 1")
    if not isinstance(lora.alpha, (int, float)) or lora.alpha <= 0:
        raise ValueError(f"lora.alpha={lora.alpha}: must be a number > 0 (the LoRA's scale is alpha / rank)")
    if not 0 <= lora.dropout < 1:
        raise ValueError(f"lora.dropout={lora.dropout}: must be in [0, 1)")
    if lora.get("path"):
        raise ValueError("lora.path is for inference (infer.py); to continue a training run use ckpt_path=<run folder>")
    if not isinstance(cfg.get("overwrite", False), bool):
        raise ValueError(f"overwrite={cfg.overwrite}: must be true or false")
    check_trainer_and_optim(cfg)
    from synth.pipelines import DTYPES

    check_accel(cfg, train_device(cfg), DTYPES[weight_dtype_name(cfg)])
    check_data_config(cfg.data, family.size_step, family.objective_class().num_text_encoders)
    check_model_path(cfg.model)
    check_offline(cfg.model)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.output_dir)
    items = load_dataset(cfg.data)
    if ckpt_path is not None:
        from synth.train.resume import check_resume, run_signature

        check_resume(cfg, ckpt_path, run_signature(cfg, items, family))
    return items


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_trainer_and_optim(cfg: DictConfig) -> None:
    """The trainer and optimizer values Lightning and torch would reject only after the model has loaded."""
    from diffusers.optimization import SchedulerType

    trainer = cfg.trainer
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs", -1)
    if not (isinstance(steps, int) and not isinstance(steps, bool)) or steps == 0 or steps < -1:
        raise ValueError(f"trainer.max_steps={steps}: must be an integer >= 1 (or -1 with trainer.max_epochs >= 1)")
    if steps == -1 and not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"trainer.max_steps=-1 needs trainer.max_epochs >= 1 (got {epochs}); or give max_steps >= 1")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate}: must be an integer >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (not _number(clip) or clip < 0):
        raise ValueError(f"trainer.gradient_clip_val={clip}: must be a finite number >= 0, or null")
    optimizer = cfg.optim.optimizer
    if not _number(optimizer.get("lr")) or optimizer.lr <= 0:
        raise ValueError(f"optim.optimizer.lr={optimizer.get('lr')}: must be a finite number > 0, e.g. 1e-4")
    for key, low in (("weight_decay", 0.0), ("eps", 0.0)):
        value = optimizer.get(key)
        if value is not None and (not _number(value) or value < low):
            raise ValueError(f"optim.optimizer.{key}={value}: must be a finite number >= {low:g}")
    betas = optimizer.get("betas")
    if betas is not None and (
        isinstance(betas, (str, int, float)) or len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"optim.optimizer.betas={betas}: must be two numbers in [0, 1), e.g. [0.9,0.999]")
    schedule = cfg.optim.lr_scheduler
    names = [member.value for member in SchedulerType]
    if schedule.get("name") not in names:
        raise ValueError(f"optim.lr_scheduler.name={schedule.get('name')}: choose one of {', '.join(names)}")
    warmup = schedule.get("num_warmup_steps", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"optim.lr_scheduler.num_warmup_steps={warmup}: must be an integer >= 0")


def make_logger(cfg: DictConfig):
    """The logger the logger group names (False for logger=none); W&B goes offline when no API key is set."""
    from hydra.utils import instantiate

    if not cfg.get("logger") or not cfg.logger.get("_target_"):
        return False
    kwargs = {}
    if cfg.logger._target_.endswith("WandbLogger"):
        from synth.wandb_log import wandb_has_key

        Path(cfg.logger.save_dir).mkdir(parents=True, exist_ok=True)
        if cfg.logger.get("offline") is None:
            kwargs["offline"] = not wandb_has_key()
    logger = instantiate(cfg.logger, **kwargs)
    logger.log_hyperparams(_plain(cfg))  # the resolved config beside the metrics (W&B config, CSV hparams.yaml)
    return logger


def _plain(cfg: DictConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def make_callbacks(cfg: DictConfig, logger) -> list:
    """The callbacks group's entries; a learning-rate monitor needs a logger, so logger=none drops it."""
    from hydra.utils import instantiate

    callbacks = [callback for callback in (cfg.get("callbacks") or {}).values() if callback]
    if not logger:
        callbacks = [c for c in callbacks if not str(c.get("_target_", "")).endswith("LearningRateMonitor")]
    return [instantiate(callback) for callback in callbacks]


def train(cfg: DictConfig) -> Path:
    """Train a LoRA as cfg says; returns the path of the final LoRA file (also printed)."""
    return fit(cfg).lora_path


@dataclass
class FitResult:
    lora_path: Path
    module: object  # the LoRAModule: its pipe holds the trained adapter (tests compare it with the file)
    trainer: object


def fit(cfg: DictConfig) -> FitResult:
    """train(), returning the trained module and trainer as well."""
    # 1. Check inputs: config values, model path, every dataset row and a resumed checkpoint's run, before
    #    any weights load; then claim the run folder (one writer; earlier outputs kept unless overwrite=true).
    items = check_train_inputs(cfg)
    family = get_family(cfg.model.family)
    output_dir = Path(cfg.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.output_dir)
    lock = claim_run_folder(output_dir, ckpt_path, bool(cfg.get("overwrite", False)))
    try:
        return _fit(cfg, items, family, output_dir, ckpt_path)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            # A full disk or a read-only folder mid-run: the file and the reason, not a traceback.
            raise ValueError(f"{error.filename or output_dir}: {error.strerror}") from None
        raise
    finally:
        if lock is not None:
            lock.close()  # unlocks


def claim_run_folder(output_dir: Path, ckpt_path: str | None, overwrite: bool):
    """Lock the run folder, drop a killed run's temp files and refuse to replace earlier outputs (rank 0)."""
    from synth.train.run_folder import (
        check_run_folder,
        is_rank_zero,
        lock_run_folder,
        remove_stale_temp_files,
    )

    if not is_rank_zero():
        return None
    try:
        lock = lock_run_folder(output_dir)
    except OSError as error:
        raise ValueError(f"output_dir={output_dir}: cannot write there ({error.strerror})") from None
    try:
        remove_stale_temp_files(output_dir)
        check_run_folder(output_dir, ckpt_path, overwrite)
    except BaseException:
        lock.close()
        raise
    return lock


def _fit(cfg: DictConfig, items, family, output_dir: Path, ckpt_path: str | None) -> FitResult:

    import lightning as L
    import torch
    from hydra.utils import instantiate

    from synth import pipelines
    from synth.train.data import ImageCaptionDataModule
    from synth.train.lora import export_lora
    from synth.train.module import LoRAModule
    from synth.train.objectives import make_objective

    # 2. Load the pipeline on the CPU; Lightning moves the denoiser, the module the frozen encoders.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dtype = pipelines.DTYPES[weight_dtype_name(cfg)]
    pipe = pipelines.load_pipeline(cfg.model, torch.device("cpu"), dtype)
    pipe.set_progress_bar_config(disable=True)
    from synth.accel import apply_train_accel

    apply_train_accel(pipe, family, cfg.get("accel"))  # before the LoRA: peft wraps quantised layers as they are

    # 3. Build the objective, the module with its LoRA (initialised from the seed), and the data.
    objective = make_objective(family, pipe, cfg.objective)
    torch.manual_seed(cfg.seed)
    module = LoRAModule(cfg, pipe, family, objective, dtype)
    from synth.train.resume import run_signature

    module.run_signature = run_signature(cfg, items, family)
    from synth.train.cache import settings_fingerprint

    fingerprint = settings_fingerprint(cfg, weight_dtype_name(cfg))
    datamodule = ImageCaptionDataModule(items, cfg.data, objective.num_text_encoders, cfg.seed, fingerprint)

    # 4. Fit, resuming from a checkpoint when asked.
    logger = make_logger(cfg)
    extra = {}
    if str(cfg.trainer.get("strategy", "auto")) == "auto" or str(cfg.trainer.strategy).startswith("ddp"):
        from synth.train.callbacks import AtomicCheckpointIO

        extra["plugins"] = [AtomicCheckpointIO()]  # sharded strategies (fsdp, deepspeed) write their own
    trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=make_callbacks(cfg, logger),
        default_root_dir=str(output_dir),
        use_distributed_sampler=False,  # the bucket sampler shards batches per rank itself
        **extra,
    )
    try:
        # weights_only: a checkpoint is data (check_train_inputs has read it the same way already).
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if logger and type(logger).__name__ == "WandbLogger":  # always close the run, even after a failure
            import wandb

            wandb.finish()

    # 5. Export the final LoRA: diffusers' format and the form ComfyUI and A1111 read (synth.lora_export).
    path = output_dir / "lora.safetensors"
    if trainer.is_global_zero:
        export_lora(path, module.denoiser, cfg, family, steps=trainer.global_step, tools_file=True)
        print(path, flush=True)
    return FitResult(path, module, trainer)
