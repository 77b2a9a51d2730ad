"""--help per entry point: each lists its own config groups and keys, not the other entry point's."""

import re

import pytest
from conftest import run_cli

from synth.config import group_options

INFER_GROUPS = ["accel", "controlnet", "experiment", "highres", "logger", "lora", "model", "prompter", "scheduler"]
TRAIN_GROUPS = ["accel", "callbacks", "data", "experiment", "logger", "lora", "model", "optim", "trainer"]


def help_text(script, tmp_path):
    result = run_cli(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def listed_groups(text):
    section = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    return sorted(re.findall(r"^(\w+): ", section, re.MULTILINE))


@pytest.mark.parametrize("script, groups, keys, absent_keys", [
    ("infer.py", INFER_GROUPS, ["prompt:", "negative_prompt:", "num_inference_steps:", "init_image:", "replay:"],
     ["ckpt_path:", "max_steps:", "caption_column:", "optimizer:"]),
    ("train.py", TRAIN_GROUPS, ["ckpt_path:", "max_steps:", "caption_column:", "optimizer:", "prompts:"],
     ["init_image:", "replay:", "denoise_strength:", "highres:"]),
])
def test_help_lists_only_this_entry_points_groups_and_keys(script, groups, keys, absent_keys, tmp_path):
    text = help_text(script, tmp_path)
    assert text.startswith(f"== synth {script} ==")
    assert listed_groups(text) == groups
    assert f"model: {', '.join(group_options('model'))}\n" in text  # every option of a group, from conf/
    config = text.split("== Config ==")[1]
    for key in keys:
        assert re.search(rf"^\s*{key}", config, re.MULTILINE), key
    for key in absent_keys:
        assert not re.search(rf"^\s*{key}", config, re.MULTILINE), key
    assert "$APP_CONFIG_GROUPS" not in text and "synth_config_groups" not in text
