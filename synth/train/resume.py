"""Continuing a run: what a checkpoint records about its run, read safely, and checked before any model loads.

Every checkpoint carries a small "synth" entry (the run signature): the model, the LoRA's shape and alpha,
a fingerprint of the dataset and the schedule's length. A resume whose config differs in any of the first
three is refused in one line naming the difference; a learning-rate schedule that depends on
trainer.max_steps gets one warning, since the continued run cannot equal one run of the new length.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import zipfile
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# diffusers' get_scheduler names whose learning rate at a step depends on num_training_steps (= max_steps).
MAX_STEPS_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def dataset_fingerprint(items, root: Path) -> str:
    """A hash of each row's file (name under data.path and size) and caption, in order: the same dataset
    moved to another folder keeps its fingerprint; an added, removed, renamed or recaptioned row changes it."""
    root = root.expanduser().resolve()
    digest = hashlib.sha256()
    for item in items:
        file = item.file.resolve()
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
        digest.update(f"{name}\0{file.stat().st_size}\0{item.caption}\0".encode())
    return digest.hexdigest()


def run_signature(cfg: DictConfig, items, family) -> dict:
    """What a checkpoint of this run records about it (plain values: it goes into the .ckpt)."""
    from synth.train.lora import adapter_config

    lora = adapter_config(cfg.lora, family)
    return {
        "model.family": str(cfg.model.family),
        "model.path": str(cfg.model.path),
        "lora.rank": int(lora["r"]),
        "lora.alpha": float(lora["lora_alpha"]),
        "lora.target_modules": sorted(lora["target_modules"]) if isinstance(lora["target_modules"], list)
        else str(lora["target_modules"]),
        "data.fingerprint": dataset_fingerprint(items, Path(str(cfg.data.path))),
        "data.rows": len(items),
        "trainer.max_steps": int(cfg.trainer.max_steps),
        "optim.lr_scheduler.name": str(cfg.optim.lr_scheduler.get("name", "")),
    }


def read_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True): a checkpoint is data, never code; unreadable files are a ValueError."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses anything that would import or run code; torch's message is ~60 lines.
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "Weights only load failed" in first or "Unsupported global" in str(error):
            raise ValueError(
                f"ckpt_path={path}: refused: it needs code to unpickle (not a checkpoint synth wrote); "
                "synth loads checkpoints as data only"
            ) from None
        raise ValueError(f"ckpt_path={path}: not a readable checkpoint (corrupt or truncated)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError):
        raise ValueError(f"ckpt_path={path}: not a readable checkpoint (corrupt or truncated)") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("synth"), dict):
        raise ValueError(f"ckpt_path={path}: not a synth training checkpoint (no run record); give a run folder "
                         "or checkpoints/*.ckpt written by train.py")
    return checkpoint


def check_resume(cfg: DictConfig, ckpt_path: str, signature: dict) -> None:
    """Refuse, in one line, a resume whose model, LoRA or dataset differs from the checkpoint's run."""
    stored = read_checkpoint(ckpt_path)["synth"]
    differences = []
    for key in ("model.family", "model.path", "lora.rank", "lora.alpha", "lora.target_modules"):
        if key in stored and stored[key] != signature[key]:
            differences.append(f"{key}={_show(signature[key])} (the checkpoint's: {_show(stored[key])})")
    if "data.fingerprint" in stored and stored["data.fingerprint"] != signature["data.fingerprint"]:
        rows = f"{signature['data.rows']} rows, the checkpoint's {stored.get('data.rows')}"
        differences.append(f"data.path={cfg.data.path} is not the checkpoint's dataset ({rows}; "
                           "files or captions differ)")
    if differences:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path}: this run differs from the checkpoint's: " + "; ".join(differences)
            + "; resume with the checkpoint's settings, or start a new run without ckpt_path"
        )
    schedule, old_steps = signature["optim.lr_scheduler.name"], stored.get("trainer.max_steps")
    if schedule in MAX_STEPS_SCHEDULES and old_steps is not None and old_steps != signature["trainer.max_steps"]:
        log.warning(
            "optim.lr_scheduler.name=%s decays over trainer.max_steps: the checkpoint's steps followed a %d-step "
            "schedule, the rest follow a %d-step one, so this LoRA will differ from one %d-step run (constant "
            "and constant_with_warmup continue exactly)",
            schedule, old_steps, signature["trainer.max_steps"], signature["trainer.max_steps"],
        )


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
