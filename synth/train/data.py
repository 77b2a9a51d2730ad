"""Training data as torch sees it: the dataset of checked rows (synth.train.rows) with augmentation, the bucket
batch sampler and a resumable loader.

Randomness (order, crops, flips, caption dropout) is drawn from (seed, epoch, index) alone, so a run that
resumes mid-epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from synth.config import parse_size
from synth.images import open_image_as_viewed
from synth.train.rows import Item, caption_dropout, make_buckets, nearest_bucket

log = logging.getLogger(__name__)


class ImageCaptionDataset(Dataset):
    """Items resized to cover their bucket, cropped and flipped; indexed by (index, (w, h), augmentation seed)."""

    def __init__(self, items: list[Item], data_cfg: DictConfig, dropout: list[float], cache_keys=None):
        self.items, self.cache_keys = items, cache_keys
        self.crop = data_cfg.crop
        self.flip = bool(data_cfg.flip)
        self.dropout = dropout

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, (width, height), seed = key
        item, rng = self.items[index], random.Random(seed)
        image = open_image_as_viewed(item.file, "image")  # as checked: EXIF rotation, 16-bit scaled to 8
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.BICUBIC)
        if self.crop == "random":
            left, top = rng.randint(0, resized[0] - width), rng.randint(0, resized[1] - height)
        else:
            left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        flipped = self.flip and rng.random() < 0.5
        if flipped:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        prompts = tuple("" if rng.random() < p else item.caption for p in self.dropout)
        return {
            "pixels": pixels,
            "prompts": prompts,
            "original_size": torch.tensor([item.height, item.width]),
            "crop_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor([height, width]),
            "key": f"{item.file}|{item.caption}|{width}x{height}|{left},{top}|{int(flipped)}",
            "cache_key": self.cache_keys[index] if self.cache_keys else "",
        }


def collate(samples: list[dict]) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("pixels", "original_size", "crop_top_left", "target_size")}
    batch["prompts"] = [s["prompts"] for s in samples]
    batch["key"] = [s["key"] for s in samples]
    batch["cache_key"] = [s["cache_key"] for s in samples]
    return batch


class BucketBatchSampler:
    """Batches drawn from one bucket each, shuffled per epoch from (seed, epoch); each rank takes its share."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch start
        self.epoch = epoch

    def batches(self) -> list[list[tuple]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        by_bucket: dict = {}
        for index, bucket in enumerate(self.buckets):
            by_bucket.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [(bucket, indices[i : i + self.batch_size]) for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        batches = batches[: len(batches) // self.world * self.world or len(batches)]  # equal counts per rank
        return [
            [(index, bucket, hash((self.seed, self.epoch, index)) & 0xFFFFFFFF) for index in indices]
            for bucket, indices in batches[self.rank :: self.world]
        ]

    def __iter__(self):
        skip, self.skip = self.skip, 0
        yield from self.batches()[skip:]

    def __len__(self) -> int:
        return len(self.batches())


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch: its state is how many batches the run has trained on."""

    consumed = 0  # batches of the current epoch that training steps have used (the module counts them)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
        self.batch_sampler.skip = self.consumed if self.consumed < len(self.batch_sampler) else 0

    def __iter__(self):
        self.consumed = self.batch_sampler.skip
        return super().__iter__()


class ImageCaptionDataModule(L.LightningDataModule):
    def __init__(self, items: list[Item], data_cfg: DictConfig, num_text_encoders: int, seed: int,
                 fingerprint: str | None = None):
        super().__init__()
        self.items, self.cfg, self.seed = items, data_cfg, seed
        self.width, self.height = parse_size(data_cfg.size, 1024)
        self.dropout = caption_dropout(data_cfg, num_text_encoders)
        self.loader = None
        if data_cfg.buckets:
            candidates = make_buckets(self.width, self.height, int(data_cfg.bucket_step), float(data_cfg.max_aspect_ratio))
            self.buckets = [nearest_bucket(item, candidates) for item in items]
        else:
            self.buckets = [(self.width, self.height)] * len(items)
        self.cache_keys = None
        if data_cfg.cache:  # content hashes, read once: the cache's file names
            from synth.train.cache import item_key

            self.cache_keys = [
                item_key(item.file, item.caption, bucket, fingerprint) for item, bucket in zip(items, self.buckets)
            ]
        self.dataset = ImageCaptionDataset(items, data_cfg, self.dropout, self.cache_keys)

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = BucketBatchSampler(self.buckets, int(self.cfg.batch_size), self.seed, rank, world)
        workers = int(self.cfg.num_workers)
        self.loader = ResumableLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            # Its own generator: each new iterator draws a worker seed, which from the global RNG would shift
            # LoRA dropout's stream and make a resumed run drop other units than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return self.loader
