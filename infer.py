"""Generate images: python infer.py model=sd15 prompt="a red car" [size=1024] [seed=3] [-m seed=0,1,2,3]."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from synth.entry import check_group_choices, run_task

GROUPS = ("model", "scheduler", "highres", "controlnet", "prompter", "lora", "logger")


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from synth.infer import infer

    if cfg.replay:
        from synth.replay import replay_config

        cfg = run_task(lambda c: replay_config(c, list(HydraConfig.get().overrides.task)), cfg)
    run_task(infer, cfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], GROUPS)
    main()
