"""The run folder: one writer at a time, a finished run's outputs kept unless resumed or overwrite=true,
a killed run's temp files removed, files that follow the umask; bad trainer values refused before loading."""

import os
import stat
import subprocess
import sys

import pytest
from conftest import run_cli
from train_utils import FAST, compose_train, make_dataset

from synth.train.run import check_train_inputs, fit
from synth.train.run_folder import lock_run_folder, training_outputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), count=2)


def one_step(data, run, *overrides):
    return compose_train(["model=tiny_sd15", f"data.path={data}", "trainer.max_steps=1", "callbacks=default",
                          "callbacks.validation.every_n_steps=0", *overrides], output_dir=run)


def test_outputs_follow_the_umask_and_killed_runs_temp_files_go(data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "loras").mkdir()
    stale = [run / ".lora.safetensors.k1ll3d", run / "checkpoints" / ".last.ckpt.k1ll3d",
             run / "loras" / ".step-000001.safetensors.k1ll3d"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert training_outputs(run) == []  # temp files are never taken for outputs
    old = os.umask(0o027)
    try:
        fit(one_step(data, run))
    finally:
        os.umask(old)
    assert not any(path.exists() for path in stale)
    for path in (run / "lora.safetensors", run / "loras" / "step-000001.safetensors", run / "checkpoints" / "last.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_a_finished_run_folder_is_kept_unless_resumed_or_overwritten(data, tmp_path):
    run = tmp_path / "run"
    fit(one_step(data, run))
    before = (run / "lora.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a training run's outputs .*overwrite=true"):
        fit(one_step(data, run))
    assert (run / "lora.safetensors").read_bytes() == before
    # Resuming the folder's own run is allowed: it continues those outputs.
    resumed = fit(one_step(data, run, "trainer.max_steps=2", "ckpt_path=last"))
    assert resumed.trainer.global_step == 2 and (run / "loras" / "step-000002.safetensors").is_file()
    # overwrite=true starts afresh: the earlier run's step files are gone, not mixed with the new ones.
    fit(one_step(data, run, "overwrite=true"))
    assert sorted(p.name for p in (run / "loras").iterdir()) == ["step-000001.safetensors"]


def test_a_stale_lock_file_does_not_block(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".train.lock").write_text("999999\n")  # left by a killed run: flock died with it
    lock = lock_run_folder(run)
    lock.close()


def test_second_writer_is_refused_in_one_line(data, tmp_path):
    run = tmp_path / "run"
    lock = lock_run_folder(run)  # this test process plays the first training
    try:
        result = run_cli("train.py", "model=tiny_sd15", f"data.path={data}", *FAST, f"hydra.run.dir={run}",
                         cwd=tmp_path)
    finally:
        lock.close()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: output_dir={run}: another train.py (pid {os.getpid()}) is writing this run folder; wait for it "
        "to finish or choose another folder (hydra.run.dir=...)"
    ]
    assert not (run / "lora.safetensors").exists()


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from synth.train.run_folder import lock_run_folder; "
            f"lock = lock_run_folder(Path({str(run)!r})); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            lock_run_folder(run)
    finally:
        holder.kill()
        holder.wait()
    lock_run_folder(run).close()


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1"),
    ("trainer.max_steps=nan", "trainer.max_steps=nan: must be an integer >= 1"),
    ("trainer.max_steps=2.5", "trainer.max_steps=2.5: must be an integer >= 1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be an integer >= 1"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be a finite number >= 0"),
    ("optim.optimizer.lr=0", "optim.optimizer.lr=0: must be a finite number > 0"),
    ("optim.optimizer.lr=inf", "optim.optimizer.lr=inf: must be a finite number > 0"),
    ("optim.optimizer.betas=[0.9]", "optim.optimizer.betas=[0.9]: must be two numbers in [0, 1)"),
    ("optim.lr_scheduler.name=warmup", "optim.lr_scheduler.name=warmup: choose one of linear, cosine"),
    ("optim.lr_scheduler.num_warmup_steps=-1", "num_warmup_steps=-1: must be an integer >= 0"),
    ("overwrite=yes", "overwrite=yes: must be true or false"),
])
def test_bad_trainer_and_optim_values(data, tmp_path, override, message):
    with pytest.raises(ValueError) as error:
        check_train_inputs(compose_train(["model=tiny_sd15", f"data.path={data}", override], output_dir=tmp_path))
    assert message in str(error.value)


@pytest.mark.parametrize("args, message", [
    (["optim.optimizer.lr=abc"], "error: optim.optimizer.lr=abc: must be a finite number > 0, e.g. 1e-4"),
    (["trainer.max_steps=-5"], "error: trainer.max_steps=-5: must be an integer >= 1 (or -1 with trainer.max_epochs >= 1)"),
])
def test_bad_values_from_the_command_line(data, tmp_path, args, message):
    run = tmp_path / "run"
    result = run_cli("train.py", "model=tiny_sd15", f"data.path={data}", *FAST, *args, f"hydra.run.dir={run}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
