"""Logging: a W&B offline run holds the loss and the validation images; checkpoints and LoRA files beside it.

CSV logging is checked in test_train_resume.py, which trains anyway."""

import pytest
from train_utils import compose_train, make_dataset

from synth.loras import read_metadata
from synth.train.run import fit


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_wandb_offline_run_holds_loss_and_validation_images(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_train(
        ["model=tiny_sd15", f"data.path={dataset}", "logger=wandb", "logger.name=test-run", "logger.tags=[test]",
         "callbacks=default", "callbacks.validation.every_n_steps=2", "callbacks.validation.prompts=[a photo of a dog]",
         "callbacks.validation.num_inference_steps=2", "callbacks.checkpoint.every_n_train_steps=2"],
        output_dir=tmp_path,
    )
    fit(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].glob("files/media/images/val/image_*.png"))
    assert len(images) == 2  # the LoRA's image and the base model's
    history = (runs[0] / ("run-" + runs[0].name.split("-")[-1] + ".wandb")).read_bytes()
    assert b"train/loss" in history and b"val/image" in history
    # The same images are on disk, side by side, and the LoRA file was written with the checkpoint.
    assert sorted(p.name for p in (tmp_path / "validation" / "step-000002").iterdir()) == ["00-base.png", "00-lora.png"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert read_metadata(str(tmp_path / "loras" / "step-000002.safetensors"))["family"] == "sd15"
