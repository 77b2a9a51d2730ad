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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-step tiny_sd15 run (rank 4) with its checkpoints, made by the CLI."""
    tmp = tmp_path_factory.mktemp("finished")
    data = make_dataset(tmp / "data", count=2)
    run = tmp / "run"
    result = run_cli("train.py", "model=tiny_sd15", f"data.path={data}", *FAST, "trainer.max_steps=1",
                     "callbacks=default", "callbacks.validation.every_n_steps=0", f"hydra.run.dir={run}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, data


@pytest.mark.parametrize("case", ["code", "corrupt", "rank"])
def test_hostile_resumes_are_one_line_before_loading(finished_run, tmp_path, case):
    import torch

    run, data = finished_run
    if case == "code":

        class Payload:
            def __reduce__(self):
                return (print, ("this ran",))

        torch.save({"state_dict": Payload()}, tmp_path / "code.ckpt")
        args = [f"ckpt_path={tmp_path / 'code.ckpt'}"]
        message = (f"error: ckpt_path={tmp_path / 'code.ckpt'}: refused: it needs code to unpickle (not a "
                   "checkpoint synth wrote); synth loads checkpoints as data only")
    elif case == "corrupt":  # a last.ckpt cut short (a full disk, a copy that stopped)
        corrupt = tmp_path / "corrupt" / "checkpoints"
        corrupt.mkdir(parents=True)
        whole = (run / "checkpoints" / "last.ckpt").read_bytes()
        (corrupt / "last.ckpt").write_bytes(whole[: len(whole) // 3])
        args = [f"ckpt_path={tmp_path / 'corrupt'}"]
        message = f"error: ckpt_path={corrupt / 'last.ckpt'}: not a readable checkpoint (corrupt or truncated)"
    else:
        args = [f"ckpt_path={run}", "lora.rank=8", "lora.alpha=8"]
        message = (f"error: ckpt_path={run}: this run differs from the checkpoint's: lora.rank=8 (the "
                   "checkpoint's: 4); lora.alpha=8.0 (the checkpoint's: 4.0); resume with the checkpoint's "
                   "settings, or start a new run without ckpt_path")
    out = tmp_path / "out"
    result = run_cli("train.py", "model=tiny_sd15", f"data.path={data}", *FAST, *args, f"hydra.run.dir={out}",
                     cwd=tmp_path)
    assert (result.returncode, result.stderr.strip().splitlines()) == (2, [message]), result.stderr[-2000:]
    assert "this ran" not in result.stdout
    assert not (out / "lora.safetensors").exists()


def test_a_finished_run_is_not_replaced(finished_run, tmp_path):
    run, data = finished_run
    before = (run / "lora.safetensors").read_bytes()
    result = run_cli("train.py", "model=tiny_sd15", f"data.path={data}", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: output_dir={run}: already holds a training run's outputs (lora.safetensors, "
        "loras/step-000001.safetensors, checkpoints/last.ckpt, ...); continue it with ckpt_path=last, train into "
        "a new folder, or set overwrite=true to replace them"
    ]
    assert (run / "lora.safetensors").read_bytes() == before
