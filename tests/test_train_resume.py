"""A run stopped mid-epoch and resumed from its checkpoint ends with the same LoRA as an uninterrupted run
(which also checks the CSV logger)."""

import csv

import pytest
import torch
from safetensors.torch import load_file
from train_utils import Crash, compose_train, make_dataset

from synth.train.run import check_train_inputs, fit, resolve_ckpt_path




def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, one_thread):
    data = make_dataset(tmp_path / "data", count=3)  # 3 batches per epoch: step 2 is mid-epoch
    common = [
        "model=tiny_sd15", f"data.path={data}", "data.flip=true", "data.crop=random", "data.caption_dropout=0.3",
        "optim.optimizer.lr=1e-2", "callbacks=default", "callbacks.validation.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=2", "optim.lr_scheduler.name=linear",
        "optim.lr_scheduler.num_warmup_steps=1",
    ]
    whole = fit(compose_train(common + ["trainer.max_steps=5", "logger=csv"], output_dir=tmp_path / "whole"))
    # The CSV logger recorded the loss and the learning rate of every step.
    [metrics] = list((tmp_path / "whole").glob("csv/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    assert len([r for r in rows if r.get("train/loss")]) == 5
    assert len([r for r in rows if r.get("lr-AdamW")]) == 5
    # The stopped run crashes after step 2, mid-epoch, as a pre-empted job would.
    stopped = compose_train(common + ["trainer.max_steps=5", "+callbacks.crash._target_=train_utils.CrashAtStep",
                                      "+callbacks.crash.step=2"], output_dir=tmp_path / "stopped")
    with pytest.raises(Crash):
        fit(stopped)
    assert (tmp_path / "stopped" / "checkpoints" / "last.ckpt").is_file()
    resumed = fit(compose_train(common + ["trainer.max_steps=5", f"ckpt_path={tmp_path / 'stopped'}"],
                                output_dir=tmp_path / "resumed"))
    assert resumed.trainer.global_step == whole.trainer.global_step == 5
    expected, actual = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_ckpt_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        resolve_ckpt_path("last", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        resolve_ckpt_path(str(tmp_path), str(tmp_path))


def test_continuing_a_finished_run_matches_one_longer_run(tmp_path, one_thread):
    """2 steps, continued to 3 (ending on the epoch's last batch), continued to 5: the same LoRA as one 5-step
    run, dropout included (the global RNG is checkpointed)."""
    data = make_dataset(tmp_path / "data", count=3)  # 3 batches per epoch
    common = [
        "model=tiny_sd15", f"data.path={data}", "data.flip=true", "data.crop=random", "data.caption_dropout=0.3",
        "lora.dropout=0.1", "optim.optimizer.lr=1e-2", "callbacks=default", "callbacks.validation.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=100",  # only the end-of-run checkpoints
    ]
    whole = fit(compose_train(common + ["trainer.max_steps=5"], output_dir=tmp_path / "whole"))
    fit(compose_train(common + ["trainer.max_steps=2"], output_dir=tmp_path / "first"))
    fit(compose_train(common + ["trainer.max_steps=3", f"ckpt_path={tmp_path / 'first'}"], output_dir=tmp_path / "second"))
    last = fit(compose_train(common + ["trainer.max_steps=5", f"ckpt_path={tmp_path / 'second'}"],
                             output_dir=tmp_path / "third"))
    assert last.trainer.global_step == 5
    assert (tmp_path / "first" / "checkpoints" / "step-000002.ckpt").is_file()  # the last step, as a periodic one
    expected, actual = load_file(whole.lora_path), load_file(last.lora_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-step run with its checkpoints (rank 4, alpha 4, tiny_sd15, a 2-image dataset)."""
    tmp = tmp_path_factory.mktemp("finished")
    data = make_dataset(tmp / "data", count=2)
    cfg = compose_train(["model=tiny_sd15", f"data.path={data}", "trainer.max_steps=1", "callbacks=default",
                         "callbacks.validation.every_n_steps=0"], output_dir=tmp / "run")
    fit(cfg)
    return tmp / "run", data


def test_resume_with_other_model_lora_or_dataset_is_refused(finished_run, tmp_path):
    run, data = finished_run
    base = ["model=tiny_sd15", f"data.path={data}", f"ckpt_path={run}"]
    check_train_inputs(compose_train(base + ["trainer.max_steps=3"], output_dir=tmp_path / "ok"))  # same: fine
    cases = {
        "lora.rank=8": "lora.rank=8 (the checkpoint's: 4)",
        "lora.alpha=2": "lora.alpha=2.0 (the checkpoint's: 4.0)",
        "lora.target_modules=[to_q]": "lora.target_modules=to_q (the checkpoint's: to_k,to_out.0,to_q,to_v)",
        "model=tiny_sdxl": "model.family=sdxl (the checkpoint's: sd15)",
    }
    for override, expected in cases.items():
        with pytest.raises(ValueError) as error:
            check_train_inputs(compose_train(base + [override], output_dir=tmp_path / "x"))
        assert expected in str(error.value) and "\n" not in str(error.value), override
    other = make_dataset(tmp_path / "other", count=2, captions=["a cat", "a dog"])
    with pytest.raises(ValueError, match=r"is not the checkpoint's dataset \(2 rows, the checkpoint's 2"):
        check_train_inputs(compose_train(base + [f"data.path={other}"], output_dir=tmp_path / "x"))


def test_max_steps_dependent_schedule_warns_once(finished_run, tmp_path, caplog):
    run, data = finished_run
    base = ["model=tiny_sd15", f"data.path={data}", f"ckpt_path={run}", "trainer.max_steps=4"]
    check_train_inputs(compose_train(base, output_dir=tmp_path / "a"))  # constant_with_warmup: exact, no warning
    assert "decays over trainer.max_steps" not in caplog.text
    check_train_inputs(compose_train(base + ["optim.lr_scheduler.name=cosine"], output_dir=tmp_path / "b"))
    warnings = [r for r in caplog.records if "decays over trainer.max_steps" in r.getMessage()]
    assert len(warnings) == 1 and "1-step schedule, the rest follow a 4-step one" in warnings[0].getMessage()


def test_unreadable_checkpoints_are_refused_before_loading(finished_run, tmp_path):
    run, data = finished_run

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    whole = (run / "checkpoints" / "last.ckpt").read_bytes()
    files = {"code.ckpt": None, "truncated.ckpt": whole[: len(whole) // 2], "empty.ckpt": b"",
             "list.ckpt": "list"}
    for name, content in files.items():
        if content is None:
            torch.save({"state_dict": Payload()}, tmp_path / name)
        elif content == "list":
            torch.save([1, 2], tmp_path / name)
        else:
            (tmp_path / name).write_bytes(content)
    expected = {"code.ckpt": "needs code to unpickle", "truncated.ckpt": "corrupt or truncated",
                "empty.ckpt": "corrupt or truncated", "list.ckpt": "not a synth training checkpoint"}
    for name, message in expected.items():
        cfg = compose_train(["model=tiny_sd15", f"data.path={data}", f"ckpt_path={tmp_path / name}"],
                            output_dir=tmp_path / "x")
        with pytest.raises(ValueError, match=message):
            check_train_inputs(cfg)
