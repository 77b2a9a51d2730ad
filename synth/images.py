"""PNG files with provenance: A1111-style `parameters` text, the resolved config, atomic no-overwrite writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"  # the text chunk A1111, ComfyUI and image viewers read
CONFIG_KEY = "synth-config"  # the resolved synth config of exactly this image, as YAML


def a1111_parameters(cfg: DictConfig, width: int, height: int, steps: int, guidance: float) -> str:
    """The prompt and settings in the A1111 `parameters` convention: prompt, negative prompt, then `Key: value, ...`."""
    fields = {
        "Steps": steps,
        "Sampler": cfg.scheduler.name,
        "CFG scale": guidance,
        "Seed": cfg.seed,
        "Size": f"{width}x{height}",
        "Model": Path(str(cfg.model.path)).name,
        "Family": cfg.model.family,
    }
    if cfg.init_image is not None:
        fields["Denoising strength"] = cfg.denoise_strength
    fields["Version"] = "synth"
    lines = [str(cfg.prompt)]
    if cfg.negative_prompt:
        lines.append(f"Negative prompt: {cfg.negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, folder: Path, stem: str, text: dict[str, str]) -> Path:
    """Write image as folder/stem.png (stem-1.png, ... if taken) with text chunks, atomically.

    The bytes go to a temporary file first and are hard-linked into place, so a crash never leaves a
    truncated PNG and an existing file is never replaced.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        for attempt in range(10_000):
            path = folder / (f"{stem}.png" if attempt == 0 else f"{stem}-{attempt}.png")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"{folder}/{stem}*.png: no free file name")
    finally:
        os.unlink(tmp)


def read_text(path: str | Path) -> dict[str, str]:
    """The PNG's text chunks."""
    with Image.open(path) as image:
        image.load()
        return dict(getattr(image, "text", {}) or {})


def read_config(path: str | Path) -> DictConfig:
    """The synth config stored in a PNG; ValueError if the file has none."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"replay={path}: no such file")
    try:
        text = read_text(path)
    except OSError as error:
        raise ValueError(f"replay={path}: not a readable image ({error})") from None
    if CONFIG_KEY not in text:
        raise ValueError(f"replay={path}: the image has no synth metadata (no '{CONFIG_KEY}' text chunk)")
    return OmegaConf.create(text[CONFIG_KEY])
