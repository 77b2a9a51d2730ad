"""What the entry points share: a one-line error and a non-zero exit for bad input, multirun-safe."""

from __future__ import annotations

import logging
import re
import sys
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from synth.config import group_options

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

    In a multirun the failed job is logged and the sweep goes on with the next job.
    """
    try:
        return task(cfg)
    except USER_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("job failed: %s", message)
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
