"""Generate images: python infer.py model=sd15 prompt="a red car" [size=1024] [seed=3] [-m seed=0,1,2,3]."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from synth.entry import run_entry_point, run_task

GROUPS = ("model", "scheduler", "highres", "controlnet", "prompter", "lora", "logger", "accel")
TEXT_KEYS = ("prompt", "negative_prompt")  # taken as typed: commas, quotes, any script (synth/cli_args.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from synth.infer import infer

    if cfg.replay:
        from synth.replay import replay_config

        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # a prompt's ${ stays text
        cfg = run_task(lambda c: replay_config(c, overrides), cfg)
        if cfg is None:  # a multirun job whose replay failed: already logged and marked
            return
    run_task(infer, cfg)


if __name__ == "__main__":
    run_entry_point(main, "infer.py", GROUPS, text_keys=TEXT_KEYS)
