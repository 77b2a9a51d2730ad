"""Serve the web UI: python ui.py [model=tiny_sdxl_turbo] [ui.port=7861] [ui.host=0.0.0.0 ui.auth=me:secret]."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from synth.entry import run_entry_point, run_task

GROUPS = ("model", "scheduler", "highres", "controlnet", "prompter", "lora", "logger", "accel")
TEXT_KEYS = ("prompt", "negative_prompt")  # taken as typed: commas, quotes, any script (synth/cli_args.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="ui")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from synth.ui_requests import check_accel_on_device, check_ui

    run_task(lambda c: check_ui(c.ui), cfg)  # an unsafe host is refused in one line before Gradio loads (seconds)
    run_task(check_accel_on_device, cfg)  # accel options this device cannot run: refused before the page starts
    from synth.ui import serve

    hydra_cfg = HydraConfig.get()
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
    run_task(lambda c: serve(c, overrides, Path(hydra_cfg.runtime.output_dir), choices), cfg)


if __name__ == "__main__":
    run_entry_point(main, "ui.py", GROUPS, text_keys=TEXT_KEYS)
