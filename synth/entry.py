"""What the entry points share: a one-line error and a non-zero exit for bad input, multirun-safe."""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from synth.config import group_options
from synth.sweep import FAILED_MARKER

log = logging.getLogger("synth")
USER_ERRORS = (ValueError, FileNotFoundError)


def check_group_choices(argv: list[str], groups: tuple[str, ...]) -> None:
    """Refuse an unknown config-group choice (model=foo) in one line, before Hydra composes anything."""
    for arg in argv:
        match = re.fullmatch(r"([a-z_]+)=([^(\[]*)", arg)  # leaves sweeps like range(...) to Hydra
        if match is None or match.group(1) not in groups:
            continue
        group, options = match.group(1), group_options(match.group(1))
        for choice in filter(None, match.group(2).split(",")):
            if choice not in options:
                print(f"error: unknown {group} {choice!r}; choose one of: {', '.join(options)}", file=sys.stderr)
                sys.exit(2)


def run_task(task: Callable, cfg):
    """Run task(cfg); a user error becomes one line on stderr and exit code 2.

    In a multirun any failure is logged and marked in the job's folder (the contact sheet shows it as an
    empty cell), and the sweep goes on with the next job.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower():
        pin_gpu(Path(HydraConfig.get().sweep.dir))
    try:
        return task(cfg)
    except Exception as error:
        message = first_line(error)
        if multirun:
            log.error("job failed: %s", message, exc_info=not isinstance(error, USER_ERRORS))
            (Path(HydraConfig.get().runtime.output_dir) / FAILED_MARKER).write_text(message + "\n")
            return None
        if not isinstance(error, USER_ERRORS):
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def pin_gpu(sweep_dir: Path, gpu_count: int | None = None) -> int | None:
    """Give this worker process one GPU of several (CUDA_VISIBLE_DEVICES), for launchers that run jobs in
    parallel worker processes (joblib). Each worker claims the next free slot in the sweep folder once,
    before CUDA starts; with more workers than GPUs the slots wrap around. Returns the GPU index, or None
    where there is nothing to choose."""
    if "SYNTH_PINNED_GPU" in os.environ:
        return int(os.environ["SYNTH_PINNED_GPU"])
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count()  # asks the driver without starting CUDA in this process
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else [str(i) for i in range(gpu_count)]
    if len(ids) < 2:
        return None  # one GPU or none: nothing to choose
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        try:
            os.close(os.open(sweep_dir / f".gpu-slot-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            continue
    gpu = ids[slot % len(ids)]
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["SYNTH_PINNED_GPU"] = gpu
    log.info("worker %d runs on GPU %s of %s", os.getpid(), gpu, ",".join(ids))
    return int(gpu)
