"""train.py from the command line: a short run prints the LoRA path; bad input is one line and exit 2; DDP."""

import pytest
from conftest import run_cli
from train_utils import FAST, make_dataset

from synth.loras import read_metadata


def test_bad_dataset_is_one_line_and_exit_2(tmp_path):
    result = run_cli("train.py", "model=tiny_sd15", f"data.path={tmp_path / 'missing'}", *FAST,
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: data.path={tmp_path / 'missing'}: no such folder"


def test_unknown_group_choice(tmp_path):
    result = run_cli("train.py", "logger=tensorboard", cwd=tmp_path)
    assert result.returncode == 2 and "unknown logger 'tensorboard'" in result.stderr


@pytest.mark.slow
def test_cli_run_prints_the_lora_path(tmp_path):
    data = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    result = run_cli("train.py", "model=tiny_sd3", f"data.path={data}", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(run / "lora.safetensors")
    assert read_metadata(str(run / "lora.safetensors"))["family"] == "sd3"


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    data = make_dataset(tmp_path / "data", count=4)
    run = tmp_path / "run"
    result = run_cli(
        "train.py", "model=tiny_sd15", f"data.path={data}", *FAST, "trainer.strategy=ddp", "trainer.devices=2",
        "callbacks=default", "callbacks.validation.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={run}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "lora.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "distributed_backend=gloo" in result.stderr + result.stdout
