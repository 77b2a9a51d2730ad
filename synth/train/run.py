"""LoRA training from a composed config: `train(cfg)` is what `python train.py` runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from synth.config import check_model_path, check_offline
from synth.families import get_family

log = logging.getLogger(__name__)

VAE_DTYPES = ("fp32", "bf16", "fp16")
PRECISION_DTYPES = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16": "fp16"}


def weight_dtype_name(cfg: DictConfig) -> str:
    """Frozen weights: weight_dtype, or with auto the half type trainer.precision computes in (fp32 otherwise)."""
    if cfg.weight_dtype != "auto":
        return cfg.weight_dtype
    return PRECISION_DTYPES.get(str(cfg.trainer.get("precision", "32")), "fp32")


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
    from synth.train.data import check_data_config, load_dataset
    from synth.train.objectives import (
        LOSS_WEIGHTING,
        PREDICTION_TYPES,
        TEXT_ENCODERS,
        TIMESTEP_SAMPLING,
    )

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
    if family.name == "sd3" and (objective.snr_gamma or objective.noise_offset or objective.prediction_type):
        raise ValueError(
            "objective.snr_gamma / noise_offset / prediction_type apply to noise-prediction families "
            "(sd15, sdxl, kolors, hunyuan_dit), not sd3's flow matching; use objective.loss_weighting"
        )
    if objective.snr_gamma is not None and objective.snr_gamma <= 0:
        raise ValueError(f"objective.snr_gamma={objective.snr_gamma}: must be > 0 (5.0 is the paper's), or null")
    if objective.shift is not None and objective.shift <= 0:
        raise ValueError(f"objective.shift={objective.shift}: must be > 0, or null for the scheduler's shift")
    if cfg.vae_dtype not in VAE_DTYPES:
        raise ValueError(f"vae_dtype={cfg.vae_dtype}: choose one of {', '.join(VAE_DTYPES)}")
    if family.name == "kolors" and cfg.vae_dtype == "fp16":
        raise ValueError("vae_dtype=fp16: Kolors' VAE overflows to NaN in fp16; use vae_dtype=fp32 or bf16")
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
    check_data_config(cfg.data, family.size_step, TEXT_ENCODERS[family.name])
    check_model_path(cfg.model)
    check_offline(cfg.model)
    resolve_ckpt_path(cfg.ckpt_path, cfg.output_dir)
    return load_dataset(cfg.data)


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
    # 1. Check inputs: config values, model path and every dataset row, before any weights load.
    items = check_train_inputs(cfg)
    family = get_family(cfg.model.family)
    output_dir = Path(cfg.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.output_dir)

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

    # 3. Build the objective, the module with its LoRA (initialised from the seed), and the data.
    objective = make_objective(family.name, pipe, cfg.objective)
    torch.manual_seed(cfg.seed)
    module = LoRAModule(cfg, pipe, family, objective)
    from synth.train.cache import settings_fingerprint

    fingerprint = settings_fingerprint(cfg, weight_dtype_name(cfg))
    datamodule = ImageCaptionDataModule(items, cfg.data, objective.num_text_encoders, cfg.seed, fingerprint)

    # 4. Fit, resuming from a checkpoint when asked.
    logger = make_logger(cfg)
    trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=make_callbacks(cfg, logger),
        default_root_dir=str(output_dir),
        use_distributed_sampler=False,  # the bucket sampler shards batches per rank itself
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        if logger and type(logger).__name__ == "WandbLogger":  # always close the run, even after a failure
            import wandb

            wandb.finish()

    # 5. Export the final LoRA in diffusers' format.
    path = output_dir / "lora.safetensors"
    if trainer.is_global_zero:
        export_lora(path, module.denoiser, cfg, family)
        print(path, flush=True)
    return FitResult(path, module, trainer)
