"""ControlNet during highres refinement: the tile/lineart chain on the twins, per-tile ControlNet calls, bad input."""

import pytest
import torch
from conftest import compose_infer, run_cli
from PIL import Image

from synth import controlnet, highres, pipelines
from synth.tiled_denoiser import TileSettings, tiled_denoiser, unet_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

CALL = {"prompt": "a red house by the sea", "num_inference_steps": 2, "guidance_scale": 7.5}


def chain(tmp_path, *overrides, size=256):
    """The staged chain's image and stats for the tiny sd15 twin (or the model in overrides)."""
    cfg = compose_infer(["model=tiny_sd15", f"size={size}", *overrides], output_dir=tmp_path)
    from synth.checks import check_inputs

    width, height = check_inputs(cfg)
    pipe = pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)
    image, stats = highres.generate(pipe, dict(CALL), cfg, width, height, seed=0)
    return torch.tensor(list(image.getdata()), dtype=torch.float32), stats


def test_tile_controlnet_changes_the_chain_and_scale_zero_does_not(tmp_path):
    plain, _ = chain(tmp_path)
    tile, stats = chain(tmp_path, "controlnet=tile")
    zero, _ = chain(tmp_path, "controlnet=tile", "controlnet.conditioning_scale=0")
    assert torch.isfinite(tile).all() and tile.shape == plain.shape
    assert (tile - plain).abs().mean() > 1.0  # the ControlNet steers the refinements
    # with zero residuals the ControlNet pipeline is exactly the plain image-to-image refinement
    assert (zero - plain).abs().max() <= 1.0
    assert stats["control_calls"] == stats["calls"]  # one ControlNet call per tiled UNet call


def test_controlnet_runs_per_tile_on_matching_crops(tmp_path, monkeypatch):
    """Every ControlNet call gets the same latent crops as its UNet call and the matching 8x condition crops."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    cfg = compose_infer(["model=tiny_sdxl", "size=256", "controlnet=tile"], output_dir=tmp_path)
    pipe = pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)
    control_pipe = controlnet.pipeline(pipe, cfg)
    seen = {"unet": [], "controlnet": []}

    def record(name, forward):
        def wrapper(module, sample, timestep, encoder_hidden_states, *args, **kwargs):
            cond = kwargs.get("controlnet_cond", args[0] if args else None)
            ids = (kwargs.get("added_cond_kwargs") or {}).get("time_ids")
            seen[name].append((tuple(sample.shape), None if cond is None else tuple(cond.shape), ids))
            return forward(module, sample, timestep, encoder_hidden_states, *args, **kwargs)
        return wrapper

    # the tiled forwards call the class's forward, below nn.Module hooks: record there
    monkeypatch.setattr(UNet2DConditionModel, "forward", record("unet", UNet2DConditionModel.forward))
    monkeypatch.setattr(ControlNetModel, "forward", record("controlnet", ControlNetModel.forward))
    settings = TileSettings(tile_size=16, tile_overlap=4, tile_batch_size=3, vae_scale_factor=8)
    stats = {}
    source = torch.zeros(1, 4, 32, 32)
    with tiled_denoiser(control_pipe, settings, stats, forward=unet_forward):
        out = control_pipe(**CALL, image=source, control_image=Image.new("RGB", (256, 256), "white"),
                           strength=1.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
    assert len(seen["unet"]) == len(seen["controlnet"]) == stats["calls"] > 2
    for (unet_shape, _, unet_ids), (control_shape, cond_shape, control_ids) in zip(seen["unet"], seen["controlnet"]):
        assert unet_shape == control_shape and unet_shape[-2:] == (16, 16)
        assert cond_shape == (control_shape[0], 3, 128, 128)  # 8 pixels per latent pixel
        assert torch.equal(unet_ids, control_ids)  # the same per-tile crop conditioning as the UNet
    assert len({tuple(ids[:, 2:4].flatten().tolist()) for _, _, ids in seen["unet"]}) > 1  # crops differ per tile


def test_one_tile_is_bitwise_the_untiled_controlnet_call(tmp_path):
    cfg = compose_infer(["model=tiny_sd15", "size=256", "controlnet=tile"], output_dir=tmp_path)
    pipe = pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)
    control_pipe = controlnet.pipeline(pipe, cfg)
    arguments = dict(CALL, image=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)),
                     control_image=Image.new("RGB", (128, 128), "orange"), strength=0.7, output_type="latent")
    plain = control_pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
    with tiled_denoiser(control_pipe, TileSettings(16, 2, 4), forward=unet_forward):
        tiled = control_pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(plain, tiled)


def test_sdxl_tile_chain_and_intermediates(tmp_path):
    from synth.infer import infer

    cfg = compose_infer(["model=tiny_sdxl", "size=256", "controlnet=tile", "highres.upscale=latent"], output_dir=tmp_path)
    [path] = infer(cfg)
    with Image.open(path) as image:
        assert image.size == (256, 256)
    from synth.images import read_config

    assert read_config(path).controlnet.name == "tile"  # replay brings the ControlNet back


def test_lineart_chain_saves_its_conditions(tmp_path):
    pytest.importorskip("synth.annotators")
    from synth.infer import infer

    cfg = compose_infer(["model=tiny_sd15", "size=256", "controlnet=lineart", "highres.save_intermediate=true"],
                        output_dir=tmp_path)
    [path] = infer(cfg)
    with Image.open(path) as image:
        assert image.size == (256, 256)
    conditions = sorted(p.name for p in tmp_path.glob("*-lineart*.png"))
    assert conditions == ["000-seed0-stage1-lineart.png", "000-seed0-stage2-lineart.png"]
    with Image.open(tmp_path / conditions[-1]) as condition:
        assert condition.size == (256, 256)
    lineart, _ = chain(tmp_path / "x", "controlnet=lineart")
    tile, _ = chain(tmp_path / "y", "controlnet=tile")
    assert (lineart - tile).abs().mean() > 1.0


def test_init_image_refinement_at_native_size_uses_the_controlnet(tmp_path):
    Image.new("RGB", (64, 64), "teal").save(tmp_path / "init.png")
    plain, _ = chain(tmp_path, f"init_image={tmp_path / 'init.png'}", size=64)
    tile, _ = chain(tmp_path, f"init_image={tmp_path / 'init.png'}", "controlnet=tile", size=64)
    assert (tile - plain).abs().mean() > 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=tiny_sd3", "size=256", "controlnet=tile"], "available for sd15, sdxl; model family sd3 has none"),
        (["model=tiny_sd15", "size=256", "controlnet=tile", "highres=none"], "highres=none turns the chain off"),
        (["model=tiny_sd15", "size=64", "controlnet=tile"], "64x64 at native size 64 has none"),
        (["model=tiny_sd15", "size=256", "controlnet=tile", "controlnet.guidance_start=0.8",
          "controlnet.guidance_end=0.5"], "guidance_start=0.8 must be below controlnet.guidance_end=0.5"),
        (["model=tiny_sd15", "size=256", "controlnet=tile", "controlnet.conditioning_scale=-1"],
         "conditioning_scale=-1: must be a number >= 0"),
        (["model=sd15", "size=1024", "controlnet=tile", "controlnet.path=/nonexistent/x"],
         "neither an existing local folder nor a hub id"),
        (["model=tiny_sd15", "size=256", "controlnet=lineart", "controlnet.detect_resolution=8"],
         "detect_resolution=8: must be an integer in [64, 4096]"),
        (["model=sd15", "size=1024", "controlnet=tile"],  # conftest sets HF_HUB_OFFLINE
         "controlnet.path=lllyasviel/control_v11f1e_sd15_tile: config.json is not available offline"),
    ],
)
def test_bad_controlnet_input_is_refused_before_loading(overrides, message):
    from synth.checks import check_inputs

    with pytest.raises((ValueError, FileNotFoundError), match=None) as error:
        check_inputs(compose_infer(overrides))
    assert message in str(error.value)


def test_controlnet_folder_without_config(tmp_path):
    from synth.checks import check_inputs

    (tmp_path / "cn").mkdir()
    with pytest.raises(FileNotFoundError, match="folder has no config.json"):
        check_inputs(compose_infer(["model=sd15", "size=1024", "controlnet=tile", f"controlnet.path={tmp_path / 'cn'}"]))


def test_offline_annotator_is_refused_before_loading(tmp_path):
    from synth.checks import check_inputs

    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    cfg = compose_infer(["model=sd15", "size=1024", "controlnet=lineart", f"controlnet.path={tmp_path / 'cn'}",
                         "controlnet.coarse=true"])
    with pytest.raises(FileNotFoundError, match="annotator=lllyasviel/Annotators: sk_model2.pth is not available"):
        check_inputs(cfg)


def test_cli_unknown_controlnet_and_wrong_family(tmp_path):
    result = run_cli("infer.py", "controlnet=depth", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown controlnet 'depth'; choose one of: lineart, none, tile"
    result = run_cli("infer.py", "model=tiny_kolors", "size=256", "controlnet=tile",
                     "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "model family kolors has none" in result.stderr
