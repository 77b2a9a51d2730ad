"""Train a LoRA: python train.py model=sd3 data.path=data/dog [trainer.max_steps=1000] [logger=csv] [ckpt_path=last]."""

import hydra
from omegaconf import DictConfig

from synth.entry import run_entry_point, run_task

GROUPS = ("model", "data", "lora", "optim", "trainer", "logger", "callbacks", "accel", "experiment")
LIST_KEYS = ("callbacks.validation.prompts",)  # each prompt taken as typed; @file: one per line (synth/cli_args.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from synth.train import train

    run_task(train, cfg)


if __name__ == "__main__":
    run_entry_point(main, "train.py", GROUPS, list_keys=LIST_KEYS)
