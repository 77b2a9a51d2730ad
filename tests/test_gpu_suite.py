"""bench/gpu_suite.py: its --smoke run on the tiny twins (CPU), its row filter, and that both sides of a row do the
same work on the same weights; the real-size configs are the published architectures (counted on the meta device)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.py"
sys.path.insert(0, str(ROOT / "bench"))

# what a row may be skipped for on a CPU-only CI machine: fp8 needs CUDA, flash needs its package, the accel rows
# need synth's accel code (an older checkout), or synth refuses the setting on this device
CPU_SKIPS = ("needs CUDA", "synth has no accel config group", "is not in this checkout", "needs torchao",
             "(not installed)", "synth refuses it on this machine")


def run_suite(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False, cwd=ROOT)


def check_rows(rows: list[dict], names: set[str]) -> None:
    """Every named row is there; a row that ran has finite seconds on both sides and their ratio; a skipped one says
    why, and only for what a CPU lacks; none failed."""
    assert {row["name"] for row in rows} == names
    for row in rows:
        assert row["error"] is None, row
        if row["skipped"]:
            assert any(reason in row["skipped"] for reason in CPU_SKIPS), row
            continue
        for side in ("synth", "diffusers"):
            assert math.isfinite(row[side]["seconds"]) and row[side]["seconds"] > 0, row
        assert math.isfinite(row["ratio"]) and row["ratio"] == pytest.approx(
            row["synth"]["seconds"] / row["diffusers"]["seconds"])
        assert row["goals"][-1]["metric"] == "ratio" and all(goal["pass"] is None for goal in row["goals"])  # smoke


def test_smoke_subset_writes_every_row(tmp_path):
    """A fast subset: two DiT families' text-to-image (eager runs; compiled / fp8 run or are skipped for a reason),
    Turbo's single step, and a training row."""
    out = tmp_path / "suite.json"
    only = "sd3_1024,sdxl_turbo_512/eager,flux_dev_1024/fp8,train_hunyuan_dit"
    result = run_suite("--smoke", "--only", only, "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["smoke"] is True
    names = {"sd3_1024/eager", "sd3_1024/compiled", "sdxl_turbo_512/eager", "flux_dev_1024/fp8", "train_hunyuan_dit/lora"}
    check_rows(payload["rows"], names)
    ran = {row["name"] for row in payload["rows"] if not row["skipped"]}
    assert {"sd3_1024/eager", "sdxl_turbo_512/eager", "train_hunyuan_dit/lora"} <= ran
    assert "skipped: quantize=fp8_dynamic needs CUDA" in result.stdout  # printed beside the row name
    assert all(name in result.stdout for name in names)


@pytest.mark.slow
def test_smoke_runs_every_row(tmp_path):
    """The whole suite on the twins, --all (several minutes on two shared cores): every row is in the JSON."""
    from gpu_suite import CASES

    out = tmp_path / "suite.json"
    result = run_suite("--smoke", "--all", "--json", str(out), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    check_rows(rows, {f"{case.name}/{setting}" for case in CASES for setting in case.all_settings()})
    assert {row["case"] for row in rows if not row["skipped"]} == {case.name for case in CASES}  # every case ran


def test_only_refuses_an_unknown_row_in_one_line():
    result = run_suite("--only", "sdxl_1024,sdxl_2048", "--list")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--only sdxl_2048: no such row" in lines[0] and "sdxl_chain_2048/eager" in lines[0]


def test_list_names_rows_and_goals():
    result = run_suite("--list", "--only", "sdxl_1024,train_*")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        "sdxl_1024/eager", "sdxl_1024/compiled", "sdxl_1024/fp8",
        "train_sd3/lora", "train_kolors/lora", "train_hunyuan_dit/lora", "train_sdxl/lora"]
    assert "<= 1.5 s" in lines[1] and "<= 2.5 s" in lines[0] and "peak <= 14 GiB" in lines[5]
    assert all("ratio <= 1.02" in line for line in lines)
    extra = run_suite("--list", "--all", "--only", "flux_dev_1024").stdout.strip().splitlines()
    assert [line.split()[0].split("/")[1] for line in extra] == ["eager", "compiled", "fp8", "fused", "flash", "first_block"]
    assert "first_block" not in run_suite("--list", "--only", "flux_dev_1024").stdout  # extras only with --all


@pytest.mark.parametrize("row", ["sd3_1024/eager", "sdxl_turbo_512/eager", "sdxl_turbo_512/compiled"])
def test_both_sides_of_a_row_make_the_same_image(row):
    """synth's side (synth.highres.generate on a composed config, synth's accel functions) and diffusers' side (the
    pipeline called directly, the same tricks by hand: here regional compile, fused q/k/v, channels-last) get the same
    weights and call: their images are the same pixels, so the ratio compares the same work."""
    import gpu_suite

    case_name, setting_name = row.split("/")
    case = next(case for case in gpu_suite.CASES if case.name == case_name)
    setting = case.settings[setting_name]
    cfg = gpu_suite.compose_row(case, setting, smoke=True)
    device = torch.device("cpu")
    synth_run, synth_pipe = gpu_suite.synth_runner(case, cfg, True, device, torch.float32)
    diffusers_run, diffusers_pipe = gpu_suite.diffusers_runner(case, cfg, True, device, torch.float32, setting)
    ours, _ = synth_run()
    theirs = diffusers_run()
    assert ours.size == theirs.size == (64, 64)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    for pipe in (synth_pipe, diffusers_pipe):  # the tricks really are on (or off), on both sides
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        compiled = [m for m in denoiser.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert {type(m).__name__ for m in compiled} == ({"BasicTransformerBlock"} if setting else set())
        assert any(hasattr(module, "to_qkv") for module in denoiser.modules()) == bool(setting.get("fuse_qkv"))
        if setting.get("channels_last"):
            assert denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_real_size_configs_have_the_published_parameter_counts():
    """Built on the meta device (no memory): SDXL's UNet 2.57B, SD3 medium's MMDiT 2.03B (the "2B"), Kolors' UNet
    2.58B, Hunyuan-DiT's 1.5B, FLUX.1 [dev]'s 11.9B."""
    from gpu_models import REAL_SIZE, build_denoiser

    expected = {"sdxl": 2.567, "sd3": 2.028, "kolors": 2.58, "hunyuan_dit": 1.50, "flux": 11.90}
    counts = {family: sum(p.numel() for p in build_denoiser(family, "meta", torch.float16).parameters()) / 1e9
              for family in REAL_SIZE}
    assert counts == pytest.approx(expected, abs=0.01)
