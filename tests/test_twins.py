"""Tests for synth.twins: every family's twin builds offline, reloads and generates images."""

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # twins must never need the hub

import filecmp

import diffusers
import numpy as np
import pytest
import torch

from synth import twins
from synth.families import get_family


def pipeline_class(family: str):
    return get_family(family).pipeline_class("text2img")




@pytest.fixture(scope="module")
def twin_root(tmp_path_factory):
    return tmp_path_factory.mktemp("twins")


@pytest.fixture(scope="module")
def pipelines(twin_root):
    """Loads each family's twin once per module, building it on first use."""
    loaded = {}

    def load(family):
        if family not in loaded:
            twin_dir = twins.ensure_twin(family, twin_root / family)
            pipeline = pipeline_class(family).from_pretrained(twin_dir)
            pipeline.set_progress_bar_config(disable=True)
            loaded[family] = pipeline
        return loaded[family]

    return load


def generate(pipeline, family, seed):
    """Runs a 2-step 64x64 text-to-image call with a seeded generator."""
    return pipeline(
        "a photo of a dog",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **get_family(family).call_kwargs({}, "text2img", 64, 64),  # 64x64; Hunyuan-DiT without resolution binning
    ).images


@pytest.mark.parametrize("family", twins.FAMILIES)
def test_twin_generates_deterministic_images(pipelines, family):
    pipeline = pipelines(family)

    first = generate(pipeline, family, seed=0)
    again = generate(pipeline, family, seed=0)
    other = generate(pipeline, family, seed=1)

    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    assert first.std() > 0
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_sd3_twin_reloads_without_t5(pipelines, twin_root):
    pipelines("sd3")  # builds the twin
    pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(
        twin_root / "sd3", text_encoder_3=None, tokenizer_3=None
    )
    pipeline.set_progress_bar_config(disable=True)

    image = generate(pipeline, "sd3", seed=0)

    assert pipeline.text_encoder_3 is None
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


def test_sd15_single_file_gives_same_pixels(pipelines, twin_root, tmp_path):
    from_folder = pipelines("sd15")
    checkpoint = twins.save_single_file_sd15(twin_root / "sd15", tmp_path / "sd15.safetensors")

    from_file = diffusers.StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(twin_root / "sd15"), local_files_only=True
    )
    from_file.set_progress_bar_config(disable=True)

    assert any(key.startswith("model.diffusion_model.input_blocks.") for key in _safetensors_keys(checkpoint))
    for name in ("unet", "vae", "text_encoder"):
        folder_state, file_state = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert folder_state.keys() == file_state.keys(), name
        assert all(torch.equal(folder_state[key], file_state[key]) for key in folder_state), f"{name}: weights changed"
    # Same weights, but in memory of another alignment (the folder's are memory-mapped at the file's offsets):
    # on one thread, CPU kernels then take other vector paths and round differently. Copied into fresh,
    # aligned memory, both must give the same pixels bit for bit, on any thread count.
    np.testing.assert_array_equal(
        generate(realigned(from_file), "sd15", seed=0), generate(realigned(copy.deepcopy(from_folder)), "sd15", seed=0)
    )


def realigned(pipeline):
    """The pipeline with every weight copied into memory torch allocates (aligned), not a memory-mapped file."""
    for component in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        for tensor in (*component.parameters(), *component.buffers()):
            tensor.data = tensor.data.clone()
    return pipeline


def _safetensors_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_build_is_bit_identical(pipelines, twin_root, tmp_path):
    pipelines("hunyuan_dit")  # the cheapest family to build twice
    rebuilt = twins.build_twin("hunyuan_dit", tmp_path / "hunyuan_dit")

    for path in sorted((twin_root / "hunyuan_dit").rglob("*")):
        if path.is_file():
            relative = path.relative_to(twin_root / "hunyuan_dit")
            assert filecmp.cmp(path, rebuilt / relative, shallow=False), relative


def test_ensure_twin_reuses_existing_folder(pipelines, twin_root, monkeypatch):
    pipelines("sd15")  # builds the twin

    def fail(*args, **kwargs):
        raise AssertionError("ensure_twin rebuilt an existing twin")

    monkeypatch.setattr(twins, "build_twin", fail)
    assert twins.ensure_twin("sd15", twin_root / "sd15") == twin_root / "sd15"


def test_ensure_twin_loser_of_a_race_discards_its_copy(tmp_path, monkeypatch):
    target = tmp_path / "twin"
    real_build = twins.build_twin

    def build_after_a_rival(family, out_dir, preset="tiny", seed=0, options=None):
        real_build(family, target, preset, seed, options)  # a rival process finishes first
        return real_build(family, out_dir, preset, seed, options)

    monkeypatch.setattr(twins, "build_twin", build_after_a_rival)

    assert twins.ensure_twin("hunyuan_dit", target) == target
    assert (target / "model_index.json").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["twin"]  # the temporary copy is gone


@pytest.mark.parametrize(("family", "preset", "bad_value"), [("sd99", "tiny", "sd99"), ("sd15", "huge", "huge")])
def test_unknown_family_or_preset_is_refused(tmp_path, family, preset, bad_value):
    with pytest.raises(ValueError, match=bad_value):
        twins.ensure_twin(family, tmp_path / "twin", preset)
    assert not (tmp_path / "twin").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", twins.FAMILIES)
def test_small_preset_builds_and_runs(tmp_path, family):
    twin_dir = twins.build_twin(family, tmp_path / family, preset="small")
    pipeline = pipeline_class(family).from_pretrained(twin_dir)
    pipeline.set_progress_bar_config(disable=True)

    image = generate(pipeline, family, seed=0)

    assert np.isfinite(image).all()
