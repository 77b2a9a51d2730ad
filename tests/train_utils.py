"""Helpers for the training tests: tiny datasets and composed train configs that run in seconds on a CPU."""

import csv
from pathlib import Path

import numpy as np
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

# A run small enough for tests: 64 px, no workers, CPU, no logger or callbacks unless a test asks.
FAST = [
    "data.size=64",
    "data.num_workers=0",
    "trainer=cpu",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=none",
    "callbacks=none",
    "lora.rank=4",
    "lora.alpha=4",
]


def compose_train(overrides=(), output_dir=None):
    """The config `python train.py <FAST> <overrides>` would run, with output_dir set for calls without Hydra."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=FAST + list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


def make_dataset(folder, count=2, sizes=((96, 80),), captions=None) -> Path:
    """count distinct smooth images (gradients in different colours) with metadata.csv in folder/train/."""
    train = Path(folder) / "train"
    train.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        x = np.linspace(0, 1, width)[None, :, None]
        y = np.linspace(0, 1, height)[:, None, None]
        colour = np.array([(index * 97) % 256, (index * 53 + 80) % 256, (index * 151 + 160) % 256]) / 255
        image = (255 * (0.5 * colour + 0.25 * x + 0.25 * y)).clip(0, 255).astype(np.uint8)
        Image.fromarray(np.broadcast_to(image, (height, width, 3)).copy()).save(train / f"{index:03d}.png")
        caption = captions[index] if captions else ("a photo of a dog" if index % 2 else "a red car parked on a street")
        rows.append({"file_name": f"{index:03d}.png", "text": caption})
    with open(train / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return Path(folder)


class Crash(RuntimeError):
    """What a pre-empted job looks like to the test: the process dies between steps."""


class CrashAtStep:
    """A Lightning callback that raises Crash when step `step` is about to start (after its checkpoints)."""

    def __new__(cls, step: int):
        import lightning as L

        class _Crash(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step >= step:
                    raise Crash(f"crashed before step {step + 1}")

        return _Crash()
