"""Weights & Biases for inference (`logger=wandb`): a run's or a whole sweep's images and settings as a table.

A single run logs its own images when it ends; in a multirun the jobs log nothing and the contact-sheet
callback logs one run for the whole sweep (every job's images, swept values and errors, plus the sheet).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def wandb_has_key() -> bool:
    """Whether this machine can log in to W&B (an API key in the environment or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wants_wandb(cfg: DictConfig) -> bool:
    logger = cfg.get("logger") or {}
    return str(logger.get("_target_", "")).endswith("WandbLogger")


def wandb_mode(logger_cfg: DictConfig) -> str:
    """WANDB_MODE wins; else logger.offline; else offline exactly when no API key is set up."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    offline = logger_cfg.get("offline")
    return "offline" if (not wandb_has_key() if offline is None else offline) else "online"


def log_table(cfg: DictConfig, save_dir: Path, columns: list[str], rows: list[list], extra: dict | None = None) -> None:
    """Log one W&B run holding `rows` (the first column a list of image paths) as the table infer/images."""
    import wandb

    save_dir.mkdir(parents=True, exist_ok=True)
    try:
        settings = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a sweep's config can hold Hydra runtime values that only its jobs resolve
        settings = OmegaConf.to_container(cfg, resolve=False)
    settings.pop("hydra", None)
    run = wandb.init(
        project=cfg.logger.get("project", "synth"),
        name=cfg.logger.get("name"),
        tags=list(cfg.logger.get("tags") or []),
        mode=wandb_mode(cfg.logger),
        dir=str(save_dir),
        config=settings,
        job_type="infer",
    )
    try:
        table = wandb.Table(columns=["image", *columns])
        gallery = []  # the images again as a media panel (offline runs keep these files; table cells not)
        for images, *values in rows:
            caption = ", ".join(f"{key}={value}" for key, value in zip(columns, values) if value not in (None, ""))
            for image in images or [None]:
                table.add_data(wandb.Image(str(image), caption=caption) if image else None, *values)
                if image:
                    gallery.append(wandb.Image(str(image), caption=caption))
        extra = {key: wandb.Image(str(value)) for key, value in (extra or {}).items()}
        run.log({"infer/images": table, "infer/gallery": gallery, **extra})
    finally:
        run.finish()
