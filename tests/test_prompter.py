"""The prompter on its offline twins: translation only when needed, seeded refinement, metadata and replay."""

import re

import numpy as np
import pytest
import torch
from conftest import compose_infer, run_cli
from PIL import Image

from synth import prompter
from synth.images import PARAMETERS_KEY, read_config, read_text
from synth.infer import infer
from synth.replay import replay_config

CJK = re.compile(r"[\u4e00-\u9fff]")
CPU = torch.device("cpu")


def settings(option):
    return compose_infer([f"prompter={option}"]).prompter


def test_translation_only_for_source_script():
    assert prompter.needs_translation("一只猫坐在窗台上", "cjk")
    assert prompter.needs_translation("a cat, 猫", "cjk")
    assert not prompter.needs_translation("a cat on a windowsill", "cjk")


def test_translation_touches_only_the_positive_prompt(tmp_path):
    [path] = infer(
        compose_infer(
            ["model=tiny_sd15", "prompter=tiny_translate", "prompt='一只猫坐在窗台上'", "negative_prompt='模糊'"],
            output_dir=tmp_path,
        )
    )
    stored = read_config(path)
    assert stored.prompt and not CJK.search(stored.prompt), "the prompt was translated"
    assert stored.prompt == "a cat sitting on a windowsill"  # the twin learned its corpus' translations
    assert stored.negative_prompt == "模糊", "the negative prompt is never processed"
    assert stored.prompter.name == "none" and stored.prompter.original_prompt == "一只猫坐在窗台上"
    assert read_text(path)[PARAMETERS_KEY].startswith("a cat sitting on a windowsill\nNegative prompt: 模糊\n")


def test_english_prompt_is_not_translated(monkeypatch):
    def fail(*args):
        raise AssertionError("the translator ran on an English prompt")

    monkeypatch.setattr(prompter, "translate", fail)
    assert prompter.process_prompt("a red car", settings("tiny_translate"), 0, CPU, torch.float32) == "a red car"


def test_refinement_starts_with_the_prompt_and_is_seeded():
    refine = settings("tiny_refine")
    first = prompter.process_prompt("a red car", refine, 3, CPU, torch.float32)
    assert first.startswith("a red car") and len(first) > len("a red car")
    assert prompter.process_prompt("a red car", refine, 3, CPU, torch.float32) == first
    others = {prompter.process_prompt("a red car", refine, seed, CPU, torch.float32) for seed in range(4, 8)}
    assert others - {first}, "other seeds sample other refinements"
    state = torch.random.get_rng_state()
    prompter.process_prompt("a red car", refine, 3, CPU, torch.float32)
    assert torch.equal(state, torch.random.get_rng_state()), "refinement leaves the global RNG alone"


def test_translate_refine_and_replay_without_the_prompter(tmp_path, monkeypatch):
    overrides = ["model=tiny_sd15", "prompter=tiny_translate_refine", "prompt='一只猫坐在窗台上'", "seed=2"]
    [path] = infer(compose_infer(overrides, output_dir=tmp_path / "a"))
    stored = read_config(path)
    assert stored.prompt.startswith("a cat sitting on a windowsill") and stored.prompt != "a cat sitting on a windowsill"
    assert stored.prompter.processed_by.name == "tiny_translate_refine"

    def fail(*args, **kwargs):
        raise AssertionError("the prompter ran again on replay")

    monkeypatch.setattr(prompter, "translate", fail)
    monkeypatch.setattr(prompter, "refine", fail)
    cfg = replay_config(compose_infer([f"replay={path}"], output_dir=tmp_path / "b"), [f"replay={path}"])
    [again] = infer(cfg)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again)))
    assert read_config(again).prompt == stored.prompt


@pytest.mark.parametrize(
    "args, message",
    [
        (["prompter=tiny_translate", "prompter.translator.source_script=latin"], "source_script=latin"),
        (["prompter=tiny_refine", "prompter.refiner.template='Input: x'"], "must contain {prompt}"),
        (["prompter=tiny_refine", "prompter.refiner.top_p=2"], "top_p=2"),
        (["prompter=translate", "prompter.translator.path=/nonexistent/marian"], "neither an existing local folder"),
        (["prompter=refine"], "not available offline"),
    ],
)
def test_cli_input_checks(tmp_path, args, message):
    result = run_cli("infer.py", "model=tiny_sd15", *args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
