"""A run stopped mid-epoch and resumed from its checkpoint ends with the same LoRA as an uninterrupted run
(which also checks the CSV logger)."""

import csv

import pytest
import torch
from safetensors.torch import load_file
from train_utils import Crash, compose_train, make_dataset

from synth.train.run import fit, resolve_ckpt_path




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
