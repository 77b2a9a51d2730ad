"""Multiruns: one pipeline load per sweep, a contact sheet laid out by the swept values, failed jobs, launchers."""

import os

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from synth.entry import pin_gpu
from synth.sweep import Job, layout, swept_axes


def multirun(tmp_path, *args):
    return run_cli("infer.py", "-m", "model=tiny_sd15", *args, f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)


def test_seed_grid_loads_once_and_writes_a_sheet(tmp_path):
    result = multirun(tmp_path, "seed=0,1,2,3")
    assert result.returncode == 0, result.stderr
    images = sorted((tmp_path / "sweep").glob("*/*.png"))
    assert [p.parent.name for p in images] == ["0", "1", "2", "3"]
    assert result.stderr.count("loading sd15 pipeline") == 1, "the sweep reuses one pipeline"
    sheet = Image.open(tmp_path / "sweep" / "contact_sheet.png")
    assert sheet.size[0] >= 2 * 256 and sheet.size[1] >= 2 * 256  # 4 jobs -> 2 x 2 cells of 256 px
    # The sheet really holds the images: the first cell is job 0's image, enlarged.
    cell = np.asarray(sheet.convert("RGB").crop((0, 0, 256, 256)).resize((64, 64), Image.BOX), dtype=float)
    first = np.asarray(Image.open(images[0]).convert("RGB"), dtype=float)
    others = np.asarray(Image.open(images[1]).convert("RGB"), dtype=float)
    assert np.abs(cell - first).mean() < 2 < np.abs(cell - others).mean()


def test_two_axes_become_rows_and_columns():
    axes = swept_axes(["model=tiny_sd15", "seed=0,1", "guidance_scale=1.5,7"])
    assert axes == [("seed", ["0", "1"]), ("guidance_scale", ["1.5", "7"])]
    jobs = [Job(f"/j{i}", {"seed": s, "guidance_scale": g}) for i, (s, g) in enumerate([("0", "1.5"), ("0", "7"), ("1", "1.5"), ("1", "7")])]
    rows, cols, cells = layout(axes, jobs)
    assert rows == ["seed=0", "seed=1"] and cols == ["guidance_scale=1.5", "guidance_scale=7"]
    assert cells[(1, 0)].values == {"seed": "1", "guidance_scale": "1.5"}
    assert cells[(0, 1)].values == {"seed": "0", "guidance_scale": "7"}


def test_failed_job_leaves_a_labelled_cell_and_the_rest_runs(tmp_path):
    result = multirun(tmp_path, "seed=0,1", "size=64,60")
    assert result.returncode == 1
    assert "2 of 4 jobs failed" in result.stderr and "width 60 is not a multiple of 8" in result.stderr
    assert len(list((tmp_path / "sweep").glob("*/*.png"))) == 2
    assert len(list((tmp_path / "sweep").glob("*/failed.txt"))) == 2
    sheet = np.asarray(Image.open(tmp_path / "sweep" / "contact_sheet.png").convert("RGB"))
    assert ((sheet == (225, 225, 225)).all(axis=-1)).sum() > 256 * 100, "grey empty cells for the failed jobs"


def test_submitit_local_launcher(tmp_path):
    result = multirun(tmp_path, "seed=0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "sweep").glob("*/*.png"))) == 2
    assert (tmp_path / "sweep" / "contact_sheet.png").exists()


def test_joblib_workers_each_pin_their_own_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    claimed = []
    for _ in range(3):  # three worker processes, simulated one after another
        monkeypatch.delenv("SYNTH_PINNED_GPU", raising=False)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        claimed.append(pin_gpu(tmp_path, gpu_count=2))
    assert claimed == [0, 1, 0]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pin_gpu(tmp_path, gpu_count=2) == 0, "a worker keeps its GPU for later jobs"
    monkeypatch.delenv("SYNTH_PINNED_GPU")
    assert pin_gpu(tmp_path / "other", gpu_count=1) is None


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_workers(tmp_path):
    result = multirun(tmp_path, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "sweep").glob("*/*.png"))) == 2


def wandb_files(folder):
    [run] = list(folder.glob("wandb/offline-run-*"))
    return run, sorted(p.name for p in (run / "files" / "media").rglob("*") if p.is_file())


def test_wandb_logs_a_run_and_a_sweep_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    single = run_cli("infer.py", "model=tiny_sd15", "logger=wandb", "num_images=2", f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    run, media = wandb_files(tmp_path / "one")
    assert sum(name.startswith("infer/gallery") or "gallery" in name for name in media) == 2, media
    table = next((run / "files" / "media" / "table").rglob("*.table.json")).read_text()
    assert '"seed","size","steps"' in table.replace(" ", "") and "64x64" in table

    sweep = multirun(tmp_path, "seed=0,1", "logger=wandb")
    assert sweep.returncode == 0, sweep.stderr
    run, media = wandb_files(tmp_path / "sweep")  # one run for the whole sweep, not one per job
    assert any("contact_sheet" in name for name in media) and sum("gallery" in name for name in media) == 2


def test_train_multirun_over_lora_rank(tmp_path):
    from train_utils import FAST, make_dataset

    from synth.loras import read_metadata

    data = make_dataset(tmp_path / "data")
    fast = [arg for arg in FAST if not arg.startswith(("lora.rank", "lora.alpha"))]
    result = run_cli(
        "train.py", "-m", "model=tiny_sd15", f"data.path={data}", *fast, "trainer.max_steps=1", "lora.rank=2,4",
        f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [int(read_metadata(str(tmp_path / "sweep" / job / "lora.safetensors"))["rank"]) for job in ("0", "1")]
    assert ranks == [2, 4]


def test_ckpt_path_auto_resumes_only_when_a_checkpoint_exists(tmp_path):
    from synth.train.run import resolve_ckpt_path

    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # first start of a cluster job
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(tmp_path / "checkpoints" / "last.ckpt")  # requeued
