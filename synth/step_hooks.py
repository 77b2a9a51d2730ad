"""What a caller may ask of a render between its denoising steps: stop it (Cancel), or hear how far it is.

The web UI renders in a worker thread through synth.infer.infer, as `python infer.py` does. Its Cancel button
must free the device within one step, and its progress bar must name the high-res stage that runs. Both ride
on the one `callback_on_step_end` the pipelines already get (synth.highres.stop_on_nonfinite): the callback asks
`on_step` here after its nan check. `observe(...)` sets the hooks for the calls made inside it, in this thread
(a ContextVar: each of Gradio's worker threads sees only its own request's). Outside `observe` (infer.py's CLI,
the tests of infer) `on_step` finds nothing and returns at once: the CLI's behaviour does not change.

Stopping is an exception raised from the callback: diffusers calls it inside its loop, so nothing after the
step runs (no decode, no PNG), and the pipeline is left as any failed call leaves it, ready for the next call.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable


class Cancelled(Exception):
    """The render was cancelled between two denoising steps; nothing of it was written. Not a ValueError: the
    request was fine, its user stopped it."""


@dataclass
class StepHooks:
    cancel: threading.Event | None = None  # set = stop at the end of the running step
    progress: Callable[[str, int, int], None] | None = None  # (stage label, steps done, steps of the stage)


_hooks: ContextVar[StepHooks | None] = ContextVar("synth_step_hooks", default=None)


@contextmanager
def observe(cancel: threading.Event | None = None, progress: Callable[[str, int, int], None] | None = None):
    """Calls made inside see `cancel` and report to `progress` (see the module docstring)."""
    token = _hooks.set(StepHooks(cancel, progress))
    try:
        yield
    finally:
        _hooks.reset(token)


def check_cancelled(where: str = "sampling") -> None:
    """Raise Cancelled if the observer's cancel event is set (before a call starts: nothing to stop yet)."""
    hooks = _hooks.get()
    if hooks is not None and hooks.cancel is not None and hooks.cancel.is_set():
        raise Cancelled(f"{where}: cancelled")


def on_step(where: str, step: int, total: int | None) -> None:
    """After denoising step `step` (0-based) of `total`: report it, then stop if cancelled. A no-op unobserved."""
    hooks = _hooks.get()
    if hooks is None:
        return
    if hooks.progress is not None:
        hooks.progress(where, step + 1, total)
    check_cancelled(f"{where}, step {step + 1}")
