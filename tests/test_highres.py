"""The staged plan (no torch), the full chain on every family's twin, init-image entry, and the exact tiled VAE."""

import pytest
import torch
from conftest import compose_infer
from omegaconf import OmegaConf
from PIL import Image

from synth.families import FAMILIES
from synth.highres import Stage, plan_stages, refine_steps

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def auto(**overrides):
    cfg = compose_infer(["highres=auto"] + [f"highres.{key}={value}" for key, value in overrides.items()])
    return cfg.highres


@pytest.mark.parametrize(
    "family, native, size, expected",
    [
        ("sd15", 512, 4096, [(512, None), (1024, 0.7), (2048, 0.7), (4096, 0.5)]),
        ("sd15", 512, 2048, [(512, None), (1024, 0.7), (2048, 0.7)]),
        ("sdxl", 1024, 2048, [(1024, None), (2048, 0.5)]),
        ("sd3", 1024, 2048, [(1024, None), (2048, 0.5)]),
        ("kolors", 1024, 2048, [(1024, None), (2048, 0.4)]),
        ("hunyuan_dit", 1024, 2048, [(1024, None), (2048, 0.4)]),
        ("sdxl", 1024, 4096, [(1024, None), (2048, 0.5), (4096, 0.5)]),
        ("sd15", 512, 512, [(512, None)]),
        ("sd15", 512, 384, [(384, None)]),
    ],
)
def test_reference_chains(family, native, size, expected):
    plan = plan_stages(auto(), family, native, size, size, 30)
    assert [(stage.width, stage.strength) for stage in plan] == expected
    assert all(stage.height == stage.width for stage in plan)


def test_non_square_plan_keeps_aspect_and_grows_at_most_2x():
    plan = plan_stages(auto(), "sd3", 1024, 3072, 1536, 28)
    assert (plan[-1].width, plan[-1].height) == (3072, 1536)
    assert abs(plan[0].width * plan[0].height - 1024**2) / 1024**2 < 0.05  # the native area
    for before, after in zip(plan, plan[1:]):
        assert after.width <= 2 * before.width + 16 and after.height <= 2 * before.height + 16
        assert after.width % 16 == 0 and after.height % 16 == 0


def test_highres_none_is_one_direct_stage():
    plan = plan_stages(compose_infer(["highres=none"]).highres, "sd15", 512, 2048, 2048, 30)
    assert plan == [Stage(2048, 2048, None, 30)]


def test_explicit_stages_and_turbo_steps():
    highres = auto(stages="[{size:1024,strength:0.6,steps:20},{size:1536x2048,strength:0.3}]")
    plan = plan_stages(highres, "sdxl", 1024, 1536, 2048, 30)
    assert [(s.width, s.height, s.strength, s.steps) for s in plan[1:]] == [(1024, 1024, 0.6, 20), (1536, 2048, 0.3, 30)]
    assert refine_steps(1, 0.5) == 2 and int(refine_steps(1, 0.4) * 0.4) >= 1  # a 1-step turbo run still refines


# --- the chain on the twins ---------------------------------------------------------------------------


def run(tmp_path, *overrides):
    from synth.infer import infer

    cfg = compose_infer(list(overrides), output_dir=tmp_path)
    return infer(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_chain_native_to_4x_every_family(tmp_path, family):
    [path] = run(tmp_path, f"model=tiny_{family}", "size=256", "highres.save_intermediate=true")
    with Image.open(path) as image:
        assert image.size == (256, 256)
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
    assert torch.isfinite(pixels).all() and pixels.std() > 0
    stages = sorted(p.name for p in tmp_path.glob("*-stage*.png"))
    assert stages == ["000-seed0-stage0-64x64.png", "000-seed0-stage1-128x128.png"]


def test_chain_latent_upscale_and_non_square(tmp_path):
    [path] = run(tmp_path, "model=tiny_sd3", "size=256x128", "highres.upscale=latent")
    with Image.open(path) as image:
        assert image.size == (256, 128)


def test_chain_is_deterministic_and_replayable(tmp_path):
    from synth.images import read_config

    [first] = run(tmp_path / "a", "model=tiny_kolors", "size=160x128", "seed=4")
    [second] = run(tmp_path / "b", "model=tiny_kolors", "size=160x128", "seed=4")
    with Image.open(first) as a, Image.open(second) as b:
        assert a.tobytes() == b.tobytes()
    stored = read_config(first)
    assert stored.highres.name == "auto" and stored.size == "160x128"


def test_at_native_size_auto_equals_none(tmp_path):
    [staged] = run(tmp_path / "a", "model=tiny_sd15", "highres=auto")
    [direct] = run(tmp_path / "b", "model=tiny_sd15", "highres=none")
    with Image.open(staged) as a, Image.open(direct) as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("init_size, entry", [(64, 0), (128, 1), (200, 1), (256, 2)])
def test_init_image_enters_at_the_largest_stage_it_covers(tmp_path, init_size, entry):
    from synth import highres, pipelines

    Image.new("RGB", (init_size, init_size), "teal").save(tmp_path / "init.png")
    cfg = compose_infer(["model=tiny_sd15", "size=256", f"init_image={tmp_path / 'init.png'}"], output_dir=tmp_path)
    device, dtype = torch.device("cpu"), torch.float32
    pipe = pipelines.for_task(pipelines.get_pipeline(cfg, device, dtype), "sd15", "img2img")
    call = {"prompt": "a", "num_inference_steps": 2, "guidance_scale": 7.5}
    image, stats = highres.generate(pipe, call, cfg, 256, 256, 0)
    assert image.size == (256, 256) and stats["entry"] == entry


def test_tiled_vae_matches_untiled_without_colour_shift():
    from diffusers import AutoencoderKL

    from synth import tiled_vae, twins
    from synth.config import cache_dir

    folder = twins.ensure_twin("sd3", f"{cache_dir()}/twins/v1/sd3-tiny")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    rows, columns = torch.linspace(0, 3, 36)[:, None], torch.linspace(0, 4, 52)[None]
    z = torch.stack([torch.sin(rows * (c + 1) * 0.5) * torch.cos(columns * 0.7 + c) for c in range(16)])[None]
    pool = torch.nn.functional.avg_pool2d
    with torch.no_grad():
        untiled = vae.decode(z).sample
        tiled = tiled_vae.decode(vae, z, 16)  # 128 px convolution tiles over a 288x416 image
        # tolerance on the 1/8 mean-pooled image (values in about [-1, 1]): float rounding only
        assert (pool(tiled, 8) - pool(untiled, 8)).abs().max() < 1e-4
        assert (tiled - untiled).abs().max() < 1e-3
        image = untiled.clamp(-1, 1)
        mean = vae.encode(image).latent_dist.mean
        assert (tiled_vae.encode(vae, image, 16) - mean).abs().max() < 1e-4


def test_tiled_vae_group_stats_pool_exactly():
    from synth.tiled_vae import CHUNK, group_stats

    norm = torch.nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, CHUNK * 2 + 13, 9) * 3 + 1
    mean, var = group_stats(x, norm)
    grouped = x.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean, grouped.mean(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(var, grouped.var(-1, unbiased=False), rtol=0, atol=1e-10)


@pytest.mark.slow
def test_sd15_twin_chain_to_4096(tmp_path):
    # the real SD1.5 chain's sizes (512 -> 1024 -> 2048 -> 4096) on the tiny twin, native size set to 512
    [path] = run(tmp_path, "model=tiny_sd15", "model.native_size=512", "size=4096")
    with Image.open(path) as image:
        assert image.size == (4096, 4096)
        assert image.getextrema() != ((0, 0), (0, 0), (0, 0))


def test_stage_sizes_in_config_yaml_roundtrip():
    highres = auto(stages="[{size:128,strength:0.5}]")
    assert OmegaConf.to_container(highres.stages) == [{"size": 128, "strength": 0.5}]


def test_tiled_true_sends_every_stage_through_the_tiler_with_the_same_pixels(tmp_path):
    """auto tiles the stages whose latent exceeds a tile; true all of them (one tile = the plain call); false none."""
    from synth import highres, pipelines

    images, stats = {}, {}
    for tiled in ("auto", "true", "false"):
        cfg = compose_infer(["model=tiny_sd15", "size=256", f"highres.tiled={tiled}"], output_dir=tmp_path)
        pipe = pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)
        call = {"prompt": "a", "num_inference_steps": 2, "guidance_scale": 7.5}
        image, stats[tiled] = highres.generate(pipe, call, cfg, 256, 256, 0)
        images[tiled] = image.tobytes()
    assert images["auto"] == images["true"]
    base_calls = stats["true"]["steps"] - stats["auto"]["steps"]
    assert base_calls > 0 and stats["true"]["tiles"] - stats["auto"]["tiles"] == base_calls  # the base: one tile a call
    assert "steps" not in stats["false"]
