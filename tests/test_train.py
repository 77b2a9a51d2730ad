"""LoRA training on every family's twin: finite loss, only LoRA weights change, and the exported file loads
with plain diffusers (synth for Hunyuan-DiT), changes the output and reproduces the trained model exactly."""

import math

import numpy as np
import pytest
import torch
from train_utils import compose_train, make_dataset

from synth import pipelines
from synth.families import FAMILIES as REGISTRY
from synth.families import get_family
from synth.lora_export import sibling_path
from synth.loras import load_loras, read_metadata
from synth.train.run import fit

FAMILIES = list(REGISTRY)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def sample(pipe, cfg, seed=0):
    """A 2-step 64 px image as floats, from a fixed seed."""
    family = get_family(cfg.model.family)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt="a photo of a dog",
        num_inference_steps=2,
        guidance_scale=float(cfg.model.guidance_scale),
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **family.call_kwargs(cfg.model, "text2img", 64, 64),
    ).images[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_exports_and_reloads(family, dataset, tmp_path):
    cfg = compose_train(
        [f"model=tiny_{family}", f"data.path={dataset}", "optim.optimizer.lr=1e-2", "trainer.max_steps=2"],
        output_dir=tmp_path,
    )
    result = fit(cfg)
    loss = result.trainer.callback_metrics["train/loss"]
    assert math.isfinite(loss.item())
    assert result.lora_path.is_file()
    assert sibling_path(result.lora_path, get_family(family).lora_export_form).is_file()  # the ComfyUI/A1111 file

    # The file says what it is.
    metadata = read_metadata(str(result.lora_path))
    assert metadata["family"] == family and metadata["rank"] == 4 and metadata["alpha"] == 4
    assert metadata["config"]["model"]["family"] == family

    # Only LoRA weights changed: every frozen weight equals the weights on disk.
    fresh = pipelines.load_pipeline(cfg.model, torch.device("cpu"), torch.float32)
    denoiser_name = get_family(family).denoiser
    trained = result.module.denoiser.state_dict()
    for name, tensor in getattr(fresh, denoiser_name).state_dict().items():
        base_name = name if name in trained else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias"
        )
        assert torch.equal(trained[base_name], tensor), name
    lora = {name: tensor for name, tensor in trained.items() if "lora_B" in name}
    assert lora and all(tensor.abs().sum() > 0 for tensor in lora.values())  # B starts at zero: it trained
    for component in ("vae", "text_encoder"):
        for name, tensor in getattr(fresh, component).state_dict().items():
            assert torch.equal(getattr(result.module.pipe, component).state_dict()[name], tensor), (component, name)

    # The exported LoRA changes the output, and reloading it reproduces the trained model's output.
    base = sample(fresh, cfg)
    trained_image = sample(result.module.pipe.__class__.from_pipe(result.module.pipe), cfg)
    if get_family(family).peft_loaded:
        load_loras(fresh, get_family(family), {"path": str(result.lora_path), "scale": 1.0})
    else:
        fresh.load_lora_weights(str(result.lora_path))  # plain diffusers
    reloaded = sample(fresh, cfg)
    assert np.abs(base - trained_image).max() > 1e-4
    np.testing.assert_allclose(reloaded, trained_image, atol=1e-5)




@pytest.mark.slow
def test_same_seed_same_lora(dataset, tmp_path, one_thread):
    from safetensors.torch import load_file

    paths = []
    for run in ("a", "b"):
        cfg = compose_train(["model=tiny_sd15", f"data.path={dataset}", "seed=3"], output_dir=tmp_path / run)
        paths.append(fit(cfg).lora_path)
    first, second = load_file(paths[0]), load_file(paths[1])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.slow
def test_overfitting_two_images_lowers_the_loss(dataset, tmp_path):
    from diffusers.utils.peft_utils import set_adapter_layers

    cfg = compose_train(
        ["model=tiny_sd15", f"data.path={dataset}", "optim.optimizer.lr=1e-2", "trainer.max_steps=60",
         "lora.rank=8", "lora.alpha=8"],
        output_dir=tmp_path,
    )
    result = fit(cfg)
    module = result.module
    batch = next(iter(result.trainer.datamodule.train_dataloader()))

    def fixed_loss() -> float:
        total = 0.0
        with torch.no_grad():
            for draw in range(8):  # the same noise and timesteps before and after
                generator = torch.Generator().manual_seed(draw)
                latents, cond = module.encode(batch, generator)
                total += module.objective.loss(module.denoiser, latents, cond, batch, generator).mean().item()
        return total / 8

    after = fixed_loss()
    set_adapter_layers(module.denoiser, enabled=False)
    before = fixed_loss()
    assert after < 0.9 * before, (before, after)


def test_nan_loss_stops_the_run_naming_the_step(dataset, tmp_path):
    from synth.train.module import NonFiniteLossError

    cfg = compose_train(["model=tiny_sd15", f"data.path={dataset}", "optim.optimizer.lr=1e30",
                         "trainer.gradient_clip_val=null", "trainer.max_steps=5"], output_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"at step \d"):
        fit(cfg)


def test_latent_and_text_cache(dataset, tmp_path, one_thread, monkeypatch):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    common = ["model=tiny_sdxl", f"data.path={dataset}", "seed=1", f"data.cache_dir={tmp_path / 'cache'}"]
    plain = fit(compose_train(common, output_dir=tmp_path / "plain"))
    cached = fit(compose_train(common + ["data.cache=true"], output_dir=tmp_path / "cached"))
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 2  # one entry per image
    expected, actual = load_file(plain.lora_path), load_file(cached.lora_path)
    for key in expected:  # the same run up to float rounding (one image at a time vs a batch through the VAE)
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-5, msg=key)

    # A second run on the same data and model reads the cache: the VAE is never called.
    def refuse(*args, **kwargs):
        raise AssertionError("VAE encode called although every image is cached")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    again = fit(compose_train(common + ["data.cache=true"], output_dir=tmp_path / "again"))
    assert all(torch.equal(load_file(again.lora_path)[k], actual[k]) for k in actual)

    with pytest.raises(ValueError, match="data.cache=true"):
        fit(compose_train(common + ["data.cache=true", "data.flip=true"], output_dir=tmp_path / "flip"))


def test_mixed_precision_keeps_lora_weights_in_fp32(dataset, tmp_path):
    cfg = compose_train(
        ["model=tiny_kolors", f"data.path={dataset}", "trainer.precision=bf16-mixed", "trainer.max_steps=1",
         "callbacks=default", "callbacks.validation.every_n_steps=1", "callbacks.validation.prompts=[a dog]",
         "callbacks.validation.compare_base=false", "callbacks.checkpoint.every_n_train_steps=100"],
        output_dir=tmp_path,
    )
    result = fit(cfg)
    assert math.isfinite(result.trainer.callback_metrics["train/loss"].item())
    params = dict(result.module.denoiser.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    assert result.module.pipe.vae.dtype == torch.float32  # Kolors' VAE stays out of half precision
    assert (tmp_path / "validation" / "step-000001" / "00-lora.png").is_file()
