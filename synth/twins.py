"""Random-weight tiny twins of every model family synth supports, built offline.

A twin is an ordinary diffusers pipeline folder (``model_index.json`` plus one
subfolder per component) with the real family's structure, latent channels,
scheduler and tokenizer types, but small widths, few layers and random weights.
Twins load through the same ``from_pretrained`` call as real weights, so tests
and benchmarks exercise synth's real code paths without the Hugging Face hub.

Tokenizers are trained here on a built-in caption corpus of English and Chinese,
so common words ("a", "photo", "dog") are real tokens of the CLIP, BERT and
ChatGLM vocabularies rather than byte or character fallbacks.
"""

import os
import shutil
import tempfile
from pathlib import Path

from synth.families import (
    FAMILIES,  # each family names its builder: Family.twin_builder
)
from synth.families.sd15_single_file import save_single_file_sd15  # noqa: F401  (part of this module's API)
from synth.twin_parts import PRESETS, SIZES, TwinSize, seed_component  # noqa: F401  (the presets; seed_component for other twin builders)


def _check_choice(family: str, preset: str) -> None:
    """Refuses an unknown family or preset with a message naming the allowed ones."""
    if family not in FAMILIES:
        raise ValueError(f"unknown twin family {family!r}; choose one of {tuple(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown twin preset {preset!r}; choose one of {PRESETS}")


# --- public API -------------------------------------------------------------------------------


def build_twin(family: str, out_dir: str | Path, preset: str = "tiny", seed: int = 0, options: dict | None = None) -> Path:
    """Builds a twin pipeline with seeded random weights and saves it as a diffusers folder.

    The same family, preset, seed and options give bit-identical weights and identical tokenizers.

    Args:
        family: One of FAMILIES.
        out_dir: Folder to save into; created if missing.
        preset: One of PRESETS ("tiny" for tests, "small" for benchmarks).
        seed: Seed for the random weights.
        options: Architecture options of the family's builder, for a variant's twin (model.twin.options: SD3.5's
            QK norm and dual-attention layers); None builds the family's own architecture.

    Returns:
        ``out_dir`` as a Path.
    """
    _check_choice(family, preset)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = FAMILIES[family].build_twin(SIZES[preset], seed, Path(scratch), **(options or {}))
        pipeline.save_pretrained(out_dir)
    return out_dir


def ensure_twin(family: str, out_dir: str | Path, preset: str = "tiny", options: dict | None = None) -> Path:
    """Returns ``out_dir`` holding the twin, building it first if it is not there.

    The twin is built in a temporary sibling folder and renamed into place, so readers never see a
    half-written folder; when two processes race, the loser discards its copy.

    Args:
        family: One of FAMILIES.
        out_dir: Folder the twin lives in.
        preset: One of PRESETS.
        options: The builder's architecture options (see build_twin).

    Returns:
        ``out_dir`` as a Path.
    """
    _check_choice(family, preset)
    return build_in_place(out_dir, "model_index.json",
                          lambda scratch: build_twin(family, scratch, preset, options=options))


def ensure_model_twin(model_cfg) -> None:
    """Build the twin a model config names (model.twin: family, preset, options) into model.path, if it has one
    (into model.single_file_config when model.path is a single-file checkpoint: the twin gives its components)."""
    twin = model_cfg.get("twin")
    if not twin:
        return
    from omegaconf import OmegaConf

    from synth.config import is_single_file

    options = twin.get("options")
    options = OmegaConf.to_container(options) if OmegaConf.is_config(options) else options
    folder = model_cfg.single_file_config if is_single_file(str(model_cfg.path)) else model_cfg.path
    ensure_twin(twin.family, folder, preset=twin.preset, options=options)


def build_in_place(out_dir: str | Path, marker: str, build) -> Path:
    """out_dir, after build(folder) has filled it, unless out_dir/marker already exists.

    build writes into a temporary sibling folder that is then renamed into place, so readers never see a
    half-written folder; when two processes race, the loser discards its (identical) copy.
    """
    out_dir = Path(out_dir)
    if (out_dir / marker).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(scratch)
        scratch.chmod(0o755)  # mkdtemp makes the folder private; a shared cache should not be
        try:
            os.rename(scratch, out_dir)
        except OSError as error:
            # Renaming onto a non-empty folder fails: another process finished first.
            if not (out_dir / marker).exists():
                raise FileExistsError(f"{out_dir} exists but holds no {marker}; delete it and retry") from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # nothing left to remove after a successful rename
    return out_dir
