"""Multirun support: a contact sheet of every job's images, laid out by the swept values.

Hydra calls `ContactSheet.on_multirun_end` once the sweep's jobs are done (conf/infer.yaml registers it
under hydra.callbacks). A job that failed leaves a labelled empty cell.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from synth.cli_args import typed_text

log = logging.getLogger("synth.sweep")
FAILED_MARKER = "failed.txt"  # written into a job's folder by synth.entry.run_task when the job fails


@dataclass
class Job:
    folder: Path
    values: dict[str, str]  # swept key -> the value this job ran with, as typed on the command line
    images: list[Path] = field(default_factory=list)
    error: str | None = None

    def label(self, keys: list[str]) -> str:
        return ", ".join(f"{key}={self.values.get(key, '?')}" for key in keys)


def swept_axes(task_overrides: list[str]) -> list[tuple[str, list[str]]]:
    """The swept keys of a multirun command line, each with its values in sweep order."""
    parser = OverridesParser.create()
    axes = []
    for override in parser.parse_overrides(list(task_overrides)):
        if override.is_sweep_override():
            values = override.sweep_iterator(transformer=Transformer.identity)
            axes.append((override.get_key_element().lstrip("+~"), [shown_value(value) for value in values]))
    return axes


def shown_value(value) -> str:
    """A swept value as the job received it, for labels: text as typed (not Hydra's escaped or quoted form,
    so a prompt reads as written), anything else as Hydra writes it (seed=0, model=sd15)."""
    if isinstance(value, str):
        return typed_text(value)
    return Override._get_value_element_as_str(value)


def read_jobs(sweep_dir: Path, keys: list[str]) -> list[Job]:
    """Every job folder of a sweep with its swept values, images and failure message."""
    parser = OverridesParser.create()
    jobs = []
    for overrides_file in sorted(latest_run_files(sweep_dir), key=lambda p: _job_number(p.parent.parent)):
        folder = overrides_file.parent.parent
        started = overrides_file.stat().st_mtime  # Hydra writes it as the job starts, before any image
        values = {}
        for override in parser.parse_overrides(_raw_overrides(OmegaConf.load(overrides_file))):
            key = override.get_key_element().lstrip("+~")
            if key in keys:
                values[key] = shown_value(override.value())
        marker = folder / FAILED_MARKER
        failed = marker.exists() and marker.stat().st_mtime >= started  # not a marker left by an earlier sweep
        error = (marker.read_text().strip() or "failed") if failed else None
        jobs.append(Job(folder, values, job_images(folder, started), error))
    return jobs


def latest_run_files(sweep_dir: Path) -> list[Path]:
    """Each job folder's overrides.yaml of its latest run: a sweep repeated into the same folder writes
    .hydra-1, .hydra-2, ... next to the first sweep's .hydra (see synth.config.run_files_subdir)."""
    latest: dict[Path, tuple[int, Path]] = {}
    for file in sweep_dir.glob("*/.hydra*/overrides.yaml"):
        match = re.fullmatch(r"\.hydra(?:-(\d+))?", file.parent.name)
        if match is None:
            continue
        number, folder = int(match.group(1) or 0), file.parent.parent
        if number >= latest.get(folder, (-1, file))[0]:
            latest[folder] = (number, file)
    return [file for _, file in latest.values()]


def job_images(folder: Path, started: float) -> list[Path]:
    """The images a job wrote: its folder's PNGs from this run, never hidden files (save_png's .tmp-*.png
    temp files, truncated if their writer was killed) nor the images of an earlier sweep into the folder."""
    return sorted(
        path for path in folder.glob("*.png")
        if not path.name.startswith(".") and path.is_file() and path.stat().st_mtime >= started
    )


def _raw_overrides(overrides) -> list[str]:
    # As Hydra's own multirun reads them: unresolved, so a prompt's escaped \${...} stays text (list() would
    # resolve the escape and hand Hydra's parser an interpolation).
    return [str(item) for item in OmegaConf.to_container(overrides, resolve=False)]


def _job_number(folder: Path) -> int:
    return int(folder.name) if folder.name.isdigit() else 1 << 30


def layout(axes: list[tuple[str, list[str]]], jobs: list[Job]) -> tuple[list[str], list[str], dict[tuple[int, int], Job]]:
    """Place jobs on a grid: with two or more swept keys, the last one is the columns and the others the
    rows; with one, a near-square grid in sweep order. Returns row labels, column labels and cells."""
    if len(axes) >= 2:
        row_keys, (col_key, col_values) = [key for key, _ in axes[:-1]], axes[-1]
        row_values = list(itertools.product(*[values for _, values in axes[:-1]]))
        cells = {}
        for job in jobs:
            row = tuple(job.values.get(key) for key in row_keys)
            if row in row_values and job.values.get(col_key) in col_values:
                cells[(row_values.index(row), col_values.index(job.values[col_key]))] = job
        row_labels = [", ".join(f"{k}={v}" for k, v in zip(row_keys, row)) for row in row_values]
        return row_labels, [f"{col_key}={value}" for value in col_values], cells
    columns = max(1, math.ceil(math.sqrt(len(jobs))))
    cells = {(index // columns, index % columns): job for index, job in enumerate(jobs)}
    return [], [], cells


def draw_sheet(axes, jobs: list[Job], thumb: int = 256):
    """The contact sheet as a PIL image: one cell per job (its images side by side), labelled."""
    from PIL import Image, ImageDraw, ImageFont

    keys = [key for key, _ in axes]
    row_labels, col_labels, cells = layout(axes, jobs)
    per_cell = max([len(job.images) for job in jobs] + [1])
    font = ImageFont.load_default(size=max(12, thumb // 16))
    line = font.size + 8
    label_w = max([int(font.getlength(text)) + 16 for text in row_labels] + [0])
    header_h = line if col_labels else 0
    rows = max([r for r, _ in cells] + [0]) + 1
    cols = max([c for _, c in cells] + [len(col_labels) - 1, 0]) + 1
    cell_w, cell_h = per_cell * thumb, thumb + (0 if col_labels else line)
    sheet = Image.new("RGB", (label_w + cols * cell_w, header_h + rows * cell_h), "white")
    pen = ImageDraw.Draw(sheet)
    for c, text in enumerate(col_labels):
        pen.text((label_w + c * cell_w + 8, 4), text, fill="black", font=font)
    for r, text in enumerate(row_labels):
        pen.text((8, header_h + r * cell_h + thumb // 2 - line // 2), text, fill="black", font=font)
    for (r, c), job in cells.items():
        x, y = label_w + c * cell_w, header_h + r * cell_h
        if job.error is not None or not job.images:
            pen.rectangle([x + 2, y + 2, x + cell_w - 3, y + thumb - 3], fill=(225, 225, 225), outline=(160, 0, 0))
            chars = max(8, int(cell_w / (font.size * 0.6)))  # rough glyph width of the default font
            message = textwrap.wrap("failed: " + (job.error or "no image"), chars)[: max(1, thumb // line - 1)]
            pen.multiline_text((x + 8, y + 8), "\n".join(message), fill=(160, 0, 0), font=font)
        for i, path in enumerate(job.images):
            with Image.open(path) as image:
                scale = min(thumb / image.width, thumb / image.height)  # small images are enlarged, pixels kept sharp
                image = image.convert("RGB").resize(
                    (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                    Image.NEAREST if scale > 1 else Image.LANCZOS,
                )
                sheet.paste(image, (x + i * thumb + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        if not col_labels:  # one swept key: each cell carries its own label underneath
            pen.text((x + 8, y + thumb + 4), job.label(keys), fill="black", font=font)
    return sheet


class ContactSheet(Callback):
    """Hydra callback: after a multirun, write contact_sheet.png into the sweep folder."""

    def __init__(self, filename: str = "contact_sheet", thumb: int = 256) -> None:
        self.filename, self.thumb = filename, thumb

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from synth.images import save_png

        sweep_dir = Path(config.hydra.sweep.dir)
        axes = swept_axes(_raw_overrides(config.hydra.overrides.task))
        jobs = read_jobs(sweep_dir, [key for key, _ in axes])
        if not jobs:
            return
        sheet = draw_sheet(axes, jobs, self.thumb)
        summary = "; ".join(f"{key}: {', '.join(values)}" for key, values in axes)
        path = save_png(sheet, sweep_dir, self.filename, {"synth-sweep": summary})
        print(path, flush=True)
        failed = [job for job in jobs if job.error is not None]
        log.info("contact sheet of %d jobs: %s", len(jobs), path)
        from synth.wandb_log import log_table, wants_wandb

        if wants_wandb(config):
            keys = [key for key, _ in axes]
            rows = [[job.images, *[job.values.get(key) for key in keys], job.error or ""] for job in jobs]
            log_table(config, sweep_dir, [*keys, "error"], rows, extra={"infer/contact_sheet": path})
        if failed:  # the sheet is written; the exit code still tells scripts that the sweep was not clean
            labels = "; ".join(f"{job.label([k for k, _ in axes])}: {job.error}" for job in failed)
            print(f"error: {len(failed)} of {len(jobs)} jobs failed: {labels}", file=sys.stderr)
            sys.exit(1)
