"""FLUX.1 [dev] and [schnell] on their twins: the guidance embedding, true CFG and negative prompts, the prompt
encoding, the tiles' position ids, the chain, LoRA training (with validation, resume) then inference, textual
inversion in CLIP-L, and the refusals. (Text-to-image and image-to-image of both twins run in test_infer.py, the
4x chain in test_highres.py, the tiled pipeline in test_tiling.py, a 2-step LoRA export in test_train.py.)"""

import numpy as np
import pytest
import torch
from conftest import compose_infer
from PIL import Image
from safetensors.torch import load_file, save_file
from train_utils import Crash, compose_train, make_dataset

from synth import pipelines
from synth.checks import check_inputs
from synth.families import get_family
from synth.infer import infer
from synth.prompt_encoding import prompt_kwargs

FLUX = get_family("flux")


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def generate(tmp_path, *overrides):
    return pixels(infer(compose_infer(["prompt=a red car", *overrides], output_dir=tmp_path))[0])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny_flux image of "a red car" with every default, which several tests compare against."""
    return generate(tmp_path_factory.mktemp("base"), "model=tiny_flux")


def pipe_for(model):
    cfg = compose_infer([f"model={model}"])
    return cfg, pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)


def test_dev_guidance_embedding_changes_pixels_schnell_has_none(tmp_path):
    low, high = (generate(tmp_path / f"dev{g}", "model=tiny_flux_dev", f"guidance_scale={g}") for g in (1.0, 8.0))
    assert np.abs(low - high).max() > 2, "[dev]'s guidance embedding must reach the transformer"
    _, pipe = pipe_for("tiny_flux_schnell")
    assert not pipe.transformer.config.guidance_embeds
    low, high = (generate(tmp_path / f"schnell{g}", "model=tiny_flux_schnell", f"guidance_scale={g}") for g in (0.0, 8.0))
    assert np.array_equal(low, high), "[schnell] has no guidance embedder"


def test_true_cfg_with_a_negative_prompt_changes_the_image(tmp_path, base):
    plain = generate(tmp_path / "plain", "model=tiny_flux", "model.true_cfg_scale=4.0")  # no negative: one pass
    negative = generate(tmp_path / "neg", "model=tiny_flux", "model.true_cfg_scale=4.0", "negative_prompt=blurry")
    assert np.abs(plain - negative).max() > 2
    assert np.array_equal(plain, base)  # true_cfg_scale without a negative prompt: one pass, as at 1


@pytest.mark.parametrize("overrides, message", [
    (["negative_prompt=blurry"], "set model.true_cfg_scale above 1"),
    (["model.true_cfg_scale=0.5"], "model.true_cfg_scale=0.5: must be a finite number >= 1"),
    (["model.max_sequence_length=600"], "flux takes 1..512 tokens"),
    (["scheduler=euler"], "scheduler=euler does not fit flux"),
    (["controlnet=tile", "size=128"], "model family flux has none"),
])
def test_refusals(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_inputs(compose_infer(["model=tiny_flux", *overrides]))


def test_prompt_encoding_is_fluxpipelines_with_t5_length_and_plain_text():
    cfg, pipe = pipe_for("tiny_flux")
    ours = prompt_kwargs(pipe, FLUX, "a red car on a street", "", 3.5, cfg.model)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt="a red car on a street", prompt_2=None, device="cpu",
                                               max_sequence_length=512)
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    assert ours["prompt_embeds"].shape[1] == 512 and "negative_prompt_embeds" not in ours
    weighted = prompt_kwargs(pipe, FLUX, "a (red car:1.5) on a street", "", 3.5, cfg.model)
    assert torch.equal(weighted["prompt_embeds"], embeds), "T5 reads the text without the syntax"
    cfg.model.max_sequence_length, cfg.model.true_cfg_scale = 128, 2.0
    short = prompt_kwargs(pipe, FLUX, "a red car", "blurry", 3.5, cfg.model)
    assert short["prompt_embeds"].shape[1] == short["negative_prompt_embeds"].shape[1] == 128


def test_tiles_carry_their_own_absolute_position_ids():
    from synth.families.flux import tiled_forward
    from synth.tiled_denoiser import TileSettings

    _, pipe = pipe_for("tiny_flux")
    model = pipe.transformer
    rows = columns = 6  # a 12x12 latent: 6x6 tokens
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, rows * columns, 64, generator=generator)
    call = dict(encoder_hidden_states=torch.randn(1, 7, model.config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=generator),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), txt_ids=torch.zeros(7, 3),
                img_ids=pipe._prepare_latent_image_ids(1, rows, columns, "cpu", torch.float32))
    with torch.no_grad():
        untiled = model(hidden, **call, return_dict=False)[0]
        # a tile as large as the latent goes through the tiled path and gives the untiled result, bit for bit
        whole = tiled_forward(model, model.forward, TileSettings(12, 2, 4, 2), {}, hidden, **call, return_dict=False)
        assert torch.equal(whole[0], untiled)
        seen = []

        def recording(tokens, *args, img_ids, **kwargs):
            seen.append(img_ids.clone())
            return model.forward(tokens, *args, img_ids=img_ids, **kwargs)

        stats = {}
        tiled = tiled_forward(model, recording, TileSettings(8, 2, 4, 2), stats, hidden, **call, return_dict=False)[0]
    assert tiled.shape == untiled.shape and stats["tiles"] == 4
    # 4x4-token tiles at rows/columns 0 and 2: each call's ids are its tile's absolute rows and columns
    for ids, (top, left) in zip(seen, [(0, 0), (0, 2), (2, 0), (2, 2)]):
        grid = ids.reshape(4, 4, 3)
        assert torch.equal(grid[:, 0, 1], torch.arange(top, top + 4.0))
        assert torch.equal(grid[0, :, 2], torch.arange(left, left + 4.0))
    assert not torch.equal(tiled, untiled)  # a tile's attention sees only its own tokens


def test_chain_at_2x_native_with_latent_upscale(tmp_path):
    [path] = infer(compose_infer(["model=tiny_flux", "size=128", "highres=auto", "highres.upscale=latent",
                                  "highres.tile_size=8", "highres.save_intermediate=true"], output_dir=tmp_path))
    image = pixels(path)
    assert image.shape == (128, 128, 3) and image.std() > 0
    assert sorted(p.name for p in tmp_path.glob("*-stage*.png")) == ["000-seed0-stage0-64x64.png"]


def test_scheduler_flow_euler_is_the_weights_own_with_dynamic_shift(tmp_path, base):
    assert np.array_equal(generate(tmp_path, "model=tiny_flux", "scheduler=flow_euler"), base)


def test_textual_inversion_into_clip_l(tmp_path, base):
    """An SD1.x embedding (CLIP-L's width) goes into FLUX's CLIP-L, whose pooled output its keyword changes."""
    save_file({"emb_params": 10 * torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              tmp_path / "style.safetensors")
    styled = generate(tmp_path / "b", "model=tiny_flux", "prompt=a red car style",
                      f"textual_inversion=[{tmp_path / 'style.safetensors'}]")
    plain = generate(tmp_path / "c", "model=tiny_flux", "prompt=a red car style")
    assert np.abs(styled - plain).max() > 2


def test_lora_training_with_validation_and_resume_then_inference(tmp_path, one_thread, base):
    from synth.loras import read_metadata
    from synth.train.run import fit

    data = make_dataset(tmp_path / "data", count=2)
    common = ["model=tiny_flux", f"data.path={data}", "optim.optimizer.lr=5e-2", "callbacks=default",
              "callbacks.validation.every_n_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
              "trainer.max_steps=3"]
    whole = fit(compose_train(common, output_dir=tmp_path / "whole"))
    assert read_metadata(str(whole.lora_path))["family"] == "flux"
    assert list((tmp_path / "whole").rglob("*.png")), "validation images"
    stopped = compose_train(common + ["+callbacks.crash._target_=train_utils.CrashAtStep", "+callbacks.crash.step=2"],
                            output_dir=tmp_path / "stopped")
    with pytest.raises(Crash):
        fit(stopped)
    resumed = fit(compose_train(common + [f"ckpt_path={tmp_path / 'stopped'}"], output_dir=tmp_path / "resumed"))
    expected, actual = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    with_lora = generate(tmp_path / "lora", "model=tiny_flux", f"lora.path={whole.lora_path}")
    assert np.abs(with_lora - base).max() > 2


def test_training_t5_length_is_the_models_inference_length():
    """objective.max_sequence_length follows model.max_sequence_length ([dev] 512, [schnell] 256) unless set."""
    assert compose_train(["model=tiny_flux"]).objective.max_sequence_length == 512
    assert compose_train(["model=tiny_flux_schnell"]).objective.max_sequence_length == 256
    assert compose_train(["model=tiny_flux", "model.max_sequence_length=128"]).objective.max_sequence_length == 128
    assert compose_train(["model=tiny_flux", "objective.max_sequence_length=64"]).objective.max_sequence_length == 64
    assert compose_train(["model=tiny_sd15"]).objective.max_sequence_length is None  # no T5


def test_training_objective_feeds_devs_guidance_embedding_and_unpacks():
    from omegaconf import OmegaConf

    from synth.families.flux import Objective

    _, pipe = pipe_for("tiny_flux")
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    losses = []
    for scale in (1.0, 8.0):
        cfg = OmegaConf.create({"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                                "mode_scale": 1.29, "loss_weighting": "none", "shift": None,
                                "max_sequence_length": 32, "guidance_scale": scale})
        objective = Objective(pipe, cfg)
        assert objective.shift == 3.0  # [dev]'s scheduler shift, as diffusers' FLUX trainer samples timesteps
        with torch.no_grad():
            cond = objective.encode_text([("a red car", "a red car")], "cpu")
            losses.append(objective.loss(pipe.transformer, latents, cond, {}, torch.Generator().manual_seed(1)))
    assert losses[0].shape == (1,) and not torch.equal(losses[0], losses[1])


def test_forge_guidance_fields_are_written_and_read_back(tmp_path, caplog):
    """Forge writes FLUX's embedded guidance as "Distilled CFG Scale" and its true CFG as "CFG scale"; synth does the
    same, and replay= of such a text sets guidance_scale and model.true_cfg_scale."""
    import logging

    from PIL import PngImagePlugin

    from synth.images import PARAMETERS_KEY, read_text
    from synth.replay import replay_config

    [png] = infer(compose_infer(["model=tiny_flux", "guidance_scale=2.5"], output_dir=tmp_path / "run"))
    settings = read_text(png)[PARAMETERS_KEY].splitlines()[-1]
    assert "CFG scale: 1, Distilled CFG Scale: 2.5," in settings

    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, "a cat\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, Schedule type: Simple, "
                                  "CFG scale: 1.5, Distilled CFG Scale: 3, Seed: 7, Size: 64x64")
    forge = tmp_path / "forge.png"
    Image.new("RGB", (64, 64)).save(forge, pnginfo=info)
    args = ["model=tiny_flux", f"replay={forge}"]
    with caplog.at_level(logging.INFO, logger="synth.replay_a1111"):
        cfg = replay_config(compose_infer(args, output_dir=tmp_path / "replay"), args)
    assert (cfg.guidance_scale, cfg.model.true_cfg_scale, cfg.negative_prompt) == (3.0, 1.5, "blurry")
    assert "CFG" not in " ".join(r.getMessage() for r in caplog.records)  # both fields mapped
