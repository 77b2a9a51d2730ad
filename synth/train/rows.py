"""A training dataset as rows: reading metadata.csv / metadata.jsonl / caption files, checking every row, and
aspect-ratio buckets. Nothing here imports torch or Lightning, so train.py refuses a bad dataset in a second,
before any heavy import (synth.train.data builds the torch Dataset and loader on these rows).

A dataset is a folder holding ``metadata.csv`` (columns ``file_name,text``) or ``metadata.jsonl``, either
directly or in its ``train/`` subfolder (the layout of Hugging Face image datasets), or a folder of images
with a same-named ``.txt`` caption beside each. Every row is checked before training; bad rows stop the run
with one message listing them all, or are skipped with ``data.skip_bad=true``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

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
