"""Disk cache of VAE posteriors and text embeddings, keyed by a content hash of image, caption, model and settings.

With data.cache=true every training image is encoded once before the first step; later steps and later runs on
the same data read the cached tensors, and on a GPU the VAE and text encoders go back to host memory until a
validation pass needs them. The posterior's mean and std are cached, not a sample, so the latents are still
drawn afresh each step from the step's generator, exactly as without the cache.

Caching needs inputs that do not change between epochs: center crops, no flips, no caption dropout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)
VERSION = "1"  # bump when what is stored changes


def check_cacheable(data_cfg: DictConfig, dropout: list[float]) -> None:
    problems = []
    if data_cfg.crop != "center":
        problems.append(f"data.crop={data_cfg.crop}")
    if data_cfg.flip:
        problems.append("data.flip=true")
    if any(dropout):
        problems.append(f"data.caption_dropout={data_cfg.caption_dropout}")
    if problems:
        raise ValueError(
            f"data.cache=true caches one encoding per image, but {', '.join(problems)} changes it every epoch; "
            "use data.crop=center data.flip=false data.caption_dropout=0, or data.cache=false"
        )


def settings_fingerprint(cfg: DictConfig, weight_dtype: str) -> str:
    """What besides the image and caption changes an encoding: the model, its dtypes and text settings."""
    model = cfg.model
    parts = [VERSION, model.family, str(model.path), str(model.get("t5", True)), weight_dtype, cfg.vae_dtype,
             str(cfg.objective.get("max_sequence_length"))]
    return "|".join(parts)


def item_key(file: Path, caption: str, bucket: tuple[int, int], fingerprint: str) -> str:
    digest = hashlib.sha256()
    digest.update(file.read_bytes())
    digest.update(f"\0{caption}\0{bucket[0]}x{bucket[1]}\0{fingerprint}".encode())
    return digest.hexdigest()


class EncodingCache:
    """One .safetensors file per (image, caption, bucket, settings) under folder."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, mean: torch.Tensor, std: torch.Tensor, cond: dict) -> None:
        from safetensors.torch import save_file

        tensors = {"latent_mean": mean, "latent_std": std, **{f"cond.{k}": v for k, v in cond.items()}}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=f".{key}.", dir=path.parent)
        os.close(handle)
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, scratch)
            from synth.train.run_folder import umask_mode

            os.chmod(scratch, umask_mode())  # mkstemp gives 0600; the cache is shared like any output
            os.replace(scratch, path)  # atomic: ranks that race write identical files
        finally:
            Path(scratch).unlink(missing_ok=True)

    def load(self, keys: list[str], device) -> tuple[torch.Tensor, torch.Tensor, dict]:
        from safetensors.torch import load_file

        entries = [load_file(self.path(key)) for key in keys]
        stacked = {name: torch.stack([entry[name] for entry in entries]).to(device) for name in entries[0]}
        cond = {name[len("cond."):]: value for name, value in stacked.items() if name.startswith("cond.")}
        return stacked["latent_mean"], stacked["latent_std"], cond

    @torch.no_grad()
    def fill(self, dataset, keys: list[str], buckets: list, objective, device) -> int:
        """Encode every item whose key is missing; returns how many were encoded."""
        missing = [index for index, key in enumerate(keys) if not self.has(key)]
        for index in missing:
            sample = dataset[(index, buckets[index], 0)]  # deterministic: center crop, no flip, no dropout
            mean, std = objective.posterior(sample["pixels"][None].to(device))
            cond = objective.encode_text([sample["prompts"]], device)
            self.save(keys[index], mean[0], std[0], {name: value[0] for name, value in cond.items()})
        if missing:
            log.info("encoded %d of %d training images into %s", len(missing), len(keys), self.folder)
        return len(missing)
