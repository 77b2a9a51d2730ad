"""Training data: reading and checking a dataset, aspect-ratio buckets, augmentation, and a resumable loader.

A dataset is a folder holding ``metadata.csv`` (columns ``file_name,text``) or ``metadata.jsonl``, either
directly or in its ``train/`` subfolder (the layout of Hugging Face image datasets), or a folder of images
with a same-named ``.txt`` caption beside each. Every row is checked before training; bad rows stop the run
with one message listing them all, or are skipped with ``data.skip_bad=true``.

Randomness (order, crops, flips, caption dropout) is drawn from (seed, epoch, index) alone, so a run that
resumes mid-epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from synth.config import parse_size
from synth.images import open_image_as_viewed

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROPS = ("center", "random")


@dataclass(frozen=True)
class Item:
    file: Path
    caption: str
    width: int
    height: int


# --- reading and checking ------------------------------------------------------------------------


def find_metadata(root: Path) -> Path | None:
    for folder in (root / "train", root):
        for name in ("metadata.csv", "metadata.jsonl"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_text(path: Path) -> str:
    """A UTF-8 text file (a BOM is allowed); anything else is a ValueError naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text; save the file as UTF-8") from None


def read_rows(root: Path, image_column: str, caption_column: str) -> list[tuple[str, dict]]:
    """(where, row) pairs: where names the row for messages; row maps column -> value (None when missing).

    A row that cannot be a row (a JSON line that is not an object, a caption file that is not UTF-8) gets
    "_problem", so it is reported with the other bad rows."""
    metadata = find_metadata(root)
    if metadata is None:
        images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        rows = []
        for image in images:
            caption_file = image.with_suffix(".txt")
            row = {image_column: image.name, caption_column: None, "_dir": str(root)}
            if caption_file.is_file():
                row["_caption_file"] = str(caption_file)
                try:
                    row[caption_column] = read_text(caption_file).strip()
                except ValueError:
                    row["_problem"] = f"{caption_file.name} is not UTF-8 text; save it as UTF-8"
            rows.append((image.name, row))
        return rows
    text = read_text(metadata)
    rows = []
    if metadata.suffix == ".csv":
        try:
            for number, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):  # 1: header
                rows.append((f"{metadata.name} line {number}", {**row, "_dir": str(metadata.parent)}))
        except csv.Error as error:
            raise ValueError(f"{metadata}: line {len(rows) + 2} is not CSV ({error})") from None
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where, row = f"{metadata.name} line {number}", {"_dir": str(metadata.parent)}
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                row["_problem"] = "not valid JSON"
            else:
                if isinstance(value, dict):
                    row = {**value, **row}
                else:
                    row["_problem"] = f"a JSON {type(value).__name__}, not an object like {{\"{image_column}\": ..., \"{caption_column}\": ...}}"
            rows.append((where, row))
    return rows


def outside(path: Path, root: Path) -> bool:
    """Whether path (symlinks followed) lies outside root."""
    return not path.resolve().is_relative_to(root.resolve())


def check_row(row: dict, image_column: str, caption_column: str, root: Path | None = None,
              allow_outside: bool = False) -> tuple[Item | None, str | None]:
    """The row as an Item, or None and why it is bad. Files outside root (absolute paths, ../, symlinks
    pointing elsewhere) are bad unless allow_outside: a dataset shared as a folder reads only that folder."""
    if "_problem" in row:
        return None, row["_problem"]
    name, caption = row.get(image_column), row.get(caption_column)
    if name in (None, ""):
        return None, f"missing column {image_column!r}"
    if caption is None:
        return None, f"missing column {caption_column!r}"
    if not isinstance(name, str):
        return None, f"{image_column} must be a file name, not {type(name).__name__}"
    if not isinstance(caption, str):
        return None, f"{caption_column} must be text, not {type(caption).__name__}"
    caption = caption.strip()
    file = Path(row["_dir"]) / name
    if root is not None and not allow_outside:
        for path in (file, Path(row.get("_caption_file", file))):
            if outside(path, root):
                return None, (f"{path.name if path != file else name}: points outside data.path={root} "
                              "(set data.allow_outside=true to allow)")
    if not file.is_file():
        return None, f"{name}: no such file"
    try:
        # As a viewer shows it (EXIF rotation applied: the bucket follows the upright size); decodes fully, so a
        # truncated file is found now; a decompression bomb is refused before its pixels are decoded.
        width, height = open_image_as_viewed(file, "image").size
    except ValueError as error:
        return None, f"{name}: {str(error).removeprefix(f'image={file}: ')}"
    if not caption:
        return None, "empty caption"
    return Item(file, caption, width, height), None


def load_dataset(data_cfg: DictConfig) -> list[Item]:
    """Read and check every row of data.path; raises one ValueError listing every bad row unless skip_bad."""
    if data_cfg.path is None:
        raise ValueError("data.path is not set: give the dataset folder, e.g. data.path=data/dog")
    root = Path(str(data_cfg.path)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={data_cfg.path}: no such folder")
    items, bad = [], []
    allow_outside = bool(data_cfg.get("allow_outside", False))
    for where, row in read_rows(root, data_cfg.image_column, data_cfg.caption_column):
        item, problem = check_row(row, data_cfg.image_column, data_cfg.caption_column, root, allow_outside)
        if item is None:
            bad.append(f"{where}: {problem}")
        else:
            items.append(item)
    if bad and not data_cfg.skip_bad:
        raise ValueError(
            f"data.path={data_cfg.path}: {len(bad)} bad row(s): " + "; ".join(bad)
            + " (fix them, or set data.skip_bad=true to skip them)"
        )
    if bad:
        log.warning("skipping %d bad row(s) of %s: %s", len(bad), data_cfg.path, "; ".join(bad))
    if not items:
        raise ValueError(f"data.path={data_cfg.path}: no usable images (an image needs a file and a caption)")
    return items


def check_data_config(data_cfg: DictConfig, size_step: int, num_text_encoders: int) -> tuple[int, int]:
    """Validate the data settings (before any model loads); returns the training size (width, height)."""
    width, height = parse_size(data_cfg.size, 1024)
    for side, value in (("width", width), ("height", height)):
        if value <= 0 or value % size_step:
            raise ValueError(f"data.size={data_cfg.size}: {side} {value} must be a positive multiple of {size_step}")
    if data_cfg.crop not in CROPS:
        raise ValueError(f"data.crop={data_cfg.crop}: choose one of {', '.join(CROPS)}")
    if not isinstance(data_cfg.batch_size, int) or data_cfg.batch_size < 1:
        raise ValueError(f"data.batch_size={data_cfg.batch_size}: must be an integer >= 1")
    dropout = caption_dropout(data_cfg, num_text_encoders)
    if any(not 0 <= p <= 1 for p in dropout):
        raise ValueError(f"data.caption_dropout={data_cfg.caption_dropout}: probabilities must be in [0, 1]")
    if data_cfg.cache:
        from synth.train.cache import check_cacheable

        check_cacheable(data_cfg, dropout)
    if data_cfg.buckets and (data_cfg.bucket_step % size_step or data_cfg.bucket_step <= 0):
        raise ValueError(f"data.bucket_step={data_cfg.bucket_step}: must be a positive multiple of {size_step}")
    return width, height


def caption_dropout(data_cfg: DictConfig, num_text_encoders: int) -> list[float]:
    """Per-text-encoder caption dropout: one number for all encoders, or a list with one per encoder."""
    value = data_cfg.caption_dropout
    if isinstance(value, (int, float)):
        return [float(value)] * num_text_encoders
    values = [float(v) for v in value]
    if len(values) != num_text_encoders:
        raise ValueError(
            f"data.caption_dropout={list(value)}: this family has {num_text_encoders} text encoder(s); "
            "give one probability for all or one per encoder"
        )
    return values


# --- buckets -------------------------------------------------------------------------------------


def make_buckets(width: int, height: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(w, h) sizes with about width*height pixels, sides multiples of step, aspect ratios up to max_ratio."""
    area = width * height
    buckets = set()
    for w in range(step, int(math.sqrt(area * max_ratio)) + step, step):
        h = max(step, round(area / w / step) * step)
        if 1 / max_ratio <= w / h <= max_ratio:
            buckets.add((w, h))
    buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(item: Item, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(item.width / item.height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


# --- dataset and sampler -------------------------------------------------------------------------


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
