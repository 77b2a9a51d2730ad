"""Train a LoRA: python train.py model=sd3 data.path=data/dog [trainer.max_steps=1000] [logger=csv] [ckpt_path=last]."""

import sys

import hydra
from omegaconf import DictConfig

from synth.entry import check_group_choices, run_task

GROUPS = ("model", "data", "lora", "optim", "trainer", "logger", "callbacks", "experiment")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from synth.train import train

    run_task(train, cfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], GROUPS)
    main()
