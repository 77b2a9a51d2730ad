"""The run folder a training writes: one writer at a time, earlier outputs never silently replaced, no stale
temp files, and files that follow the umask.

A lock (fcntl.flock on <run>/.train.lock) keeps a second train.py out of a folder another one is writing;
the kernel drops it when its holder dies, so a killed run never blocks the next. A folder that already holds
a training's outputs is refused unless this run resumes it (ckpt_path inside it) or says overwrite=true.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
# Hidden scratch files that atomic writes rename into place; a killed run may leave them behind.
TEMP_PATTERNS = (".lora.safetensors.*", ".lora.*.safetensors.*", "loras/.step-*.safetensors.*", "checkpoints/.*.ckpt.*")


def is_rank_zero() -> bool:
    """The process that owns the run folder: DDP children (LOCAL_RANK), other nodes and srun/torchrun ranks
    write into the same folder as their rank 0 and must not lock or check it again."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK",
                                                             "SLURM_PROCID"))


def training_outputs(folder: Path) -> list[Path]:
    """A training run's outputs in folder (exact names: hidden temp files never count)."""
    found = [folder / "lora.safetensors"] if (folder / "lora.safetensors").is_file() else []
    found += sorted((folder / "loras").glob("step-*.safetensors"))
    found += sorted((folder / "checkpoints").glob("*.ckpt"))
    return [path for path in found if not path.name.startswith(".")]


def lock_run_folder(folder: Path):
    """Hold <folder>/.train.lock for this process's life (returns the open file; closing it unlocks)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(
            f"output_dir={folder}: another train.py (pid {holder}) is writing this run folder; wait for it "
            "to finish or choose another folder (hydra.run.dir=...)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_run_folder(folder: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse to train into a folder holding another training's outputs, unless resuming it or overwrite=true;
    with overwrite=true the earlier outputs are removed first, so none is mistaken for this run's."""
    outputs = training_outputs(folder)
    if not outputs:
        return
    if ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(folder.resolve()):
        return  # resuming this folder's own run: its outputs are the ones it continues
    if not overwrite:
        shown = ", ".join(str(path.relative_to(folder)) for path in outputs[:3]) + (", ..." if len(outputs) > 3 else "")
        raise ValueError(
            f"output_dir={folder}: already holds a training run's outputs ({shown}); continue it with "
            "ckpt_path=last, train into a new folder, or set overwrite=true to replace them"
        )
    for path in outputs:
        path.unlink()
    validation = folder / "validation"
    if validation.is_dir():
        shutil.rmtree(validation)
    log.warning("overwrite=true: removed %d earlier output(s) of %s", len(outputs), folder)


def remove_stale_temp_files(folder: Path) -> None:
    """Scratch files of a killed run's atomic writes (only called while this process holds the lock)."""
    for pattern in TEMP_PATTERNS:
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
            log.info("removed a killed run's temp file %s", path)


def umask_mode() -> int:
    """0o666 less the process umask: what open() gives a new file (mkstemp gives 0600)."""
    from synth.images import current_umask

    return 0o666 & ~current_umask()
