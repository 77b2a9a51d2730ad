"""SD3.5 Large, Large Turbo and Medium as configs of the sd3 family: their settings, their twins' architecture,
skip-layer guidance, the tile limit from their own transformer config, and LoRA training then inference.
(Text-to-image and image-to-image run in test_infer.py, which takes every tiny_* config.)"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_infer, run_cli
from PIL import Image
from train_utils import compose_train, make_dataset

from synth import highres, pipelines
from synth.checks import check_inputs
from synth.infer import infer

SD35 = ["sd35_large", "sd35_large_turbo", "sd35_medium"]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def generate(tmp_path, *overrides):
    return pixels(infer(compose_infer(list(overrides), output_dir=tmp_path))[0])


@pytest.mark.parametrize(
    "name, path, steps, guidance, limit",
    [
        ("sd35_large", "stabilityai/stable-diffusion-3.5-large", 28, 3.5, 3072),
        ("sd35_large_turbo", "stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0, 3072),
        ("sd35_medium", "stabilityai/stable-diffusion-3.5-medium", 40, 4.5, 6144),
    ],
)
def test_configs_carry_the_model_cards_settings(name, path, steps, guidance, limit):
    model = compose_infer([f"model={name}"]).model
    assert model.family == "sd3" and model.path == path and model.single_file_config == path
    assert (model.num_inference_steps, model.guidance_scale, model.untiled_limit_px) == (steps, guidance, limit)
    assert model.native_size == 1024 and model.cuda_dtype == "bf16"
    assert model.skip_layer_guidance.layers is None  # off unless asked for


def transformer_config(model_name):
    cfg = compose_infer([f"model={model_name}"])
    pipelines.ensure_weights(cfg.model)
    return json.loads((Path(cfg.model.path) / "transformer" / "config.json").read_text())


def test_twins_have_their_architectures_distinguishing_parts():
    sd3, large, medium = (transformer_config(f"tiny_{name}") for name in ("sd3", "sd35_large", "sd35_medium"))
    assert sd3["qk_norm"] is None and sd3["dual_attention_layers"] == []
    assert large["qk_norm"] == "rms_norm" and large["dual_attention_layers"] == []
    assert medium["qk_norm"] == "rms_norm" and medium["dual_attention_layers"] == [0, 1]
    assert medium["pos_embed_max_size"] == 2 * large["pos_embed_max_size"]  # as 384 against 192 in the real ones
    # Turbo is a distilled Large: the same architecture (one twin, like SDXL-Turbo's)
    assert compose_infer(["model=tiny_sd35_large_turbo"]).model.path == compose_infer(["model=tiny_sd35_large"]).model.path


def count_transformer_calls(monkeypatch):
    """Counts SD3Transformer2DModel forwards and the skip_layers each got."""
    from diffusers import SD3Transformer2DModel

    calls = []
    original = SD3Transformer2DModel.forward

    def forward(self, *args, **kwargs):
        calls.append(kwargs.get("skip_layers"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", forward)
    return calls


SLG = ["model=tiny_sd35_medium", "num_inference_steps=3", "guidance_scale=5", "model.skip_layer_guidance.start=0",
       "model.skip_layer_guidance.stop=1"]


def test_skip_layer_guidance_runs_the_extra_pass_and_changes_pixels(tmp_path, monkeypatch):
    calls = count_transformer_calls(monkeypatch)
    base = generate(tmp_path / "off", *SLG)
    assert calls == [None] * 3  # one CFG-batched pass per step
    calls.clear()
    guided = generate(tmp_path / "on", *SLG, "model.skip_layer_guidance.layers=[1,2]")
    # diffusers guides the steps strictly inside (start, stop) of the schedule: steps 1 and 2 of 3
    assert calls == [None, None, [1, 2], None, [1, 2]]
    assert np.abs(guided - base).max() > 2
    # the scale is the strength of that extra term: zero gives the plain image back
    unscaled = generate(tmp_path / "zero", *SLG, "model.skip_layer_guidance.layers=[1,2]",
                        "model.skip_layer_guidance.scale=0")
    assert np.abs(unscaled - base).max() <= 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.skip_layer_guidance.layers=[a]"], "model.skip_layer_guidance.layers=['a']: give transformer block"),
        (["model.skip_layer_guidance.layers=[1]", "model.skip_layer_guidance.scale=-1"],
         "model.skip_layer_guidance.scale=-1: must be a finite number >= 0"),
        (["model.skip_layer_guidance.layers=[1]", "model.skip_layer_guidance.start=0.5",
          "model.skip_layer_guidance.stop=0.2"], "start=0.5 must be below stop=0.2"),
        (["model.skip_layer_guidance.layers=[1]", "guidance_scale=1"],
         "skip-layer guidance runs with classifier-free guidance only"),
    ],
)
def test_bad_skip_layer_guidance_is_refused_before_loading(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_inputs(compose_infer(["model=sd35_medium", *overrides]))  # the real hub id: nothing may load


def test_skip_layer_guidance_refusals_on_the_command_line(tmp_path):
    Image.new("RGB", (64, 64), "teal").save(tmp_path / "init.png")
    img2img = run_cli("infer.py", "model=tiny_sd35_medium", "model.skip_layer_guidance.layers=[1]",
                      f"init_image={tmp_path / 'init.png'}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert img2img.returncode == 2 and "StableDiffusion3Img2ImgPipeline has no skip-layer guidance" in img2img.stderr
    missing = run_cli("infer.py", "model=tiny_sd35_medium", "model.skip_layer_guidance.layers=[1,9]",
                      f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert missing.returncode == 2
    assert "this transformer has 4 blocks (0..3); [9] do not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and sorted(p.name for p in tmp_path.rglob("*.png")) == ["init.png"]


def test_tile_limit_comes_from_each_twins_own_config(tmp_path):
    """Large's twin covers 256 px untiled, Medium's 512 px: at 384 px Large must tile, Medium need not."""
    cfg = compose_infer(["model=tiny_sd35_large", "size=384", "highres.tiled=false"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="positional embedding covers 256 px, the chain reaches 384 px"):
        infer(cfg)
    [untiled] = infer(compose_infer(["model=tiny_sd35_medium", "size=384", "highres.tiled=false"],
                                    output_dir=tmp_path / "medium"))
    assert Image.open(untiled).size == (384, 384)

    # The tiled chain on Large: tiles clamped to its 32-latent-pixel limit, however large tile_size asks.
    cfg = compose_infer(["model=tiny_sd35_large", "size=384", "highres.tiled=true", "highres.tile_size=48",
                         "highres.tile_overlap=8"], output_dir=tmp_path / "large")
    check_inputs(cfg)
    device, dtype = torch.device("cpu"), torch.float32
    pipe = pipelines.get_pipeline(cfg, device, dtype)
    call = {"prompt": "a red car", "num_inference_steps": 2, "guidance_scale": 3.5,
            **pipelines.get_family(cfg.model.family).call_kwargs(cfg.model, "text2img", 384, 384)}
    image, stats = highres.generate(pipe, call, cfg, 384, 384, 0)
    assert image.size == (384, 384)
    assert stats["tiles"] > stats["steps"]  # every refined step ran over several tiles


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", ["sd35_medium", "sd35_large"])
def test_lora_training_then_inference(name, dataset, tmp_path):
    from synth.loras import read_metadata
    from synth.train.run import fit

    cfg = compose_train([f"model=tiny_{name}", f"data.path={dataset}", "optim.optimizer.lr=5e-2"],
                        output_dir=tmp_path / "train")
    result = fit(cfg)
    metadata = read_metadata(str(result.lora_path))
    assert metadata["family"] == "sd3" and metadata["config"]["model"]["path"] == cfg.model.path
    base = generate(tmp_path / "base", f"model=tiny_{name}")
    with_lora = generate(tmp_path / "lora", f"model=tiny_{name}", f"lora.path={result.lora_path}")
    assert np.abs(with_lora - base).max() > 2
