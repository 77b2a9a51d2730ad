"""Text-to-image and image-to-image for every family on its offline twin, through synth.infer.infer."""

import numpy as np
import pytest
from conftest import compose_infer
from PIL import Image

from synth import pipelines
from synth.config import twin_models
from synth.images import CONFIG_KEY, PARAMETERS_KEY, read_config, read_text
from synth.infer import infer

TWINS = twin_models()  # conf/model/tiny_*.yaml: every family and variant


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def generate(tmp_path, *overrides):
    return infer(compose_infer(list(overrides), output_dir=tmp_path))


@pytest.fixture(scope="module")
def init_image(tmp_path_factory):
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3) * 0.5 + rng.integers(0, 128, (64, 64, 3))
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("model", TWINS)
def test_text2img_is_seeded(model, tmp_path):
    [a] = generate(tmp_path / "a", f"model={model}", "seed=1", "prompt=a red car")
    [b] = generate(tmp_path / "b", f"model={model}", "seed=1", "prompt=a red car")
    [c] = generate(tmp_path / "c", f"model={model}", "seed=2", "prompt=a red car")
    assert Image.open(a).size == (64, 64)
    assert np.array_equal(pixels(a), pixels(b)), "same seed, same pixels"
    assert np.abs(pixels(a) - pixels(c)).mean() > 1, "another seed, other pixels"
    assert pixels(a).std() > 1, "not a constant image"


@pytest.mark.parametrize("model", TWINS)
def test_img2img(model, tmp_path, init_image):
    args = [f"model={model}", "num_inference_steps=4", f"init_image={init_image}", "denoise_strength=0.5"]
    [a] = generate(tmp_path / "a", *args)
    [b] = generate(tmp_path / "b", *args)
    assert Image.open(a).size == (64, 64)
    assert np.array_equal(pixels(a), pixels(b))
    flipped = tmp_path / "flipped.png"
    Image.open(init_image).transpose(Image.FLIP_LEFT_RIGHT).save(flipped)
    [c] = generate(tmp_path / "c", *args[:2], f"init_image={flipped}", "denoise_strength=0.5")
    assert np.abs(pixels(a) - pixels(c)).mean() > 0.5, "the init image shapes the output"
    assert "Denoising strength: 0.5" in read_text(a)[PARAMETERS_KEY]


def test_img2img_resizes_to_requested_size(tmp_path, init_image):
    [path] = generate(tmp_path, "model=tiny_sd3", f"init_image={init_image}", "size=96x64", "num_inference_steps=4")
    assert Image.open(path).size == (96, 64)


def test_num_images_each_replayable_by_seed(tmp_path):
    paths = generate(tmp_path / "batch", "model=tiny_sd15", "num_images=3", "seed=10")
    assert [p.name for p in paths] == ["000-seed10.png", "001-seed11.png", "002-seed12.png"]
    assert read_config(paths[2]).seed == 12 and read_config(paths[2]).num_images == 1
    [single] = generate(tmp_path / "single", "model=tiny_sd15", "seed=12")
    assert np.array_equal(pixels(paths[2]), pixels(single))
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))


def test_metadata(tmp_path):
    [path] = generate(tmp_path, "model=tiny_sd15", "prompt=a red car", "negative_prompt=blurry", "seed=4")
    text = read_text(path)
    assert text[PARAMETERS_KEY].startswith("a red car\nNegative prompt: blurry\nSteps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 4, Size: 64x64")  # PNDM ran
    stored = read_config(path)
    assert stored.model.family == "sd15" and stored.prompt == "a red car" and "${" not in text[CONFIG_KEY]


def test_scheduler_swap_reuses_weights(tmp_path):
    [a] = generate(tmp_path / "a", "model=tiny_sd15", "num_inference_steps=3")
    loads = pipelines.load_count
    [b] = generate(tmp_path / "b", "model=tiny_sd15", "num_inference_steps=3", "scheduler=euler_a")
    assert type(pipelines._cache["pipe"].scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    [c] = generate(tmp_path / "c", "model=tiny_sd15", "num_inference_steps=3", "seed=3")
    assert pipelines.load_count == loads, "a scheduler or seed change does not reload the pipeline"
    assert not np.array_equal(pixels(a), pixels(b))


def test_sdxl_turbo_uses_its_own_scheduler(tmp_path):
    generate(tmp_path, "model=tiny_sdxl_turbo")
    scheduler = pipelines._cache["pipe"].scheduler
    assert type(scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert scheduler.config.timestep_spacing == "trailing"


def test_sd3_without_t5(tmp_path):
    [with_t5] = generate(tmp_path / "a", "model=tiny_sd3")
    [without] = generate(tmp_path / "b", "model=tiny_sd3", "model.t5=false")
    assert pipelines._cache["pipe"].text_encoder_3 is None
    assert not np.array_equal(pixels(with_t5), pixels(without))


def test_single_file_sd15_checkpoint(tmp_path):
    from synth.twins import save_single_file_sd15

    [reference] = generate(tmp_path / "a", "model=tiny_sd15", "seed=3")
    twin = compose_infer(["model=tiny_sd15"]).model.path
    checkpoint = save_single_file_sd15(twin, tmp_path / "tiny-sd15.safetensors")
    [single] = generate(
        tmp_path / "b", "model=sd15", f"model.path={checkpoint}", f"model.single_file_config={twin}",
        "size=64", "num_inference_steps=2", "seed=3",
    )
    assert np.abs(pixels(reference) - pixels(single)).max() <= 1
