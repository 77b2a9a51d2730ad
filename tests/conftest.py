"""Shared test setup: no network, a fresh twin cache per session, composed configs and the real CLI."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the hub fails instead of hanging
os.environ["WANDB_MODE"] = "disabled"
# Twins are rebuilt once per test session, so a stale cache from an older synth can never be tested.
os.environ.setdefault("SYNTH_CACHE_DIR", tempfile.mkdtemp(prefix="synth-test-cache-"))

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

import synth.config  # noqa: E402,F401  (registers the synth_cache resolver)

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


def compose_infer(overrides=(), output_dir=None):
    """The config `python infer.py <overrides>` would run, with output_dir set for calls without Hydra."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="infer", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


def family_twins(where=lambda family: True) -> list[str]:
    """model=tiny_<family> for each registered family (synth.families) that `where(family)` accepts."""
    from synth.families import FAMILIES

    return [f"tiny_{name}" for name, family in FAMILIES.items() if where(family)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(script, *args, cwd, env=None):
    """Run `python <script> args...` as a user would; returns the CompletedProcess. env: extra variables."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env} if env else None,
    )


@pytest.fixture
def compose_cfg():
    return compose_infer


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: CPU reductions split over threads can sum in another order from run to run, and tiny
    models run faster on one thread than on two contended ones. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
