"""PNG writing: provenance chunks round-trip, nothing is overwritten, a failed write leaves no file."""

import pytest
from conftest import compose_infer
from omegaconf import OmegaConf
from PIL import Image

from synth.images import CONFIG_KEY, PARAMETERS_KEY, a1111_parameters, read_config, read_text, save_png


def test_text_chunks_round_trip(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "blue"), tmp_path, "a", {PARAMETERS_KEY: "a cat\nSteps: 2", CONFIG_KEY: "seed: 3\n"})
    assert read_text(path)[PARAMETERS_KEY] == "a cat\nSteps: 2"
    assert read_config(path).seed == 3


def test_existing_image_is_never_overwritten(tmp_path):
    first = save_png(Image.new("RGB", (8, 8), "blue"), tmp_path, "img", {})
    second = save_png(Image.new("RGB", (8, 8), "red"), tmp_path, "img", {})
    assert first.name == "img.png" and second.name == "img-1.png"
    assert Image.open(first).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img.png"]


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(Image.new("RGB", (8, 8)), tmp_path, "img", {})
    assert list(tmp_path.iterdir()) == []


def test_a1111_parameters_layout(tmp_path):
    cfg = compose_infer(["model=tiny_sd15", "prompt=a red car", "negative_prompt=blurry", "seed=7", "init_image=x.png"])
    text = a1111_parameters(cfg, 64, 48, 2, 7.5)
    prompt, negative, fields = text.split("\n")
    assert prompt == "a red car" and negative == "Negative prompt: blurry"
    assert "Steps: 2, Sampler: default, CFG scale: 7.5, Seed: 7, Size: 64x48" in fields
    assert "Denoising strength: 0.75" in fields
    assert OmegaConf.to_yaml(cfg)  # the config itself serialises
