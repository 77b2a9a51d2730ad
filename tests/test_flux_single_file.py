"""FLUX single-file checkpoints: a transformer in BFL's layout (what flux1-dev.safetensors holds) with the other
components from model.single_file_config. The twin's transformer is written in BFL's layout (flux.py's BFL_* tables,
the inverse of diffusers' converter, which this checks at FLUX.1's real sizes) and loads to the folder's weights
and pixels; files that do not fit are refused in one line."""

import copy

import numpy as np
import pytest
import torch
from conftest import compose_infer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from synth import pipelines
from synth.checks import check_inputs
from synth.families.flux import from_bfl_state_dict, save_single_file_flux, to_bfl_state_dict
from synth.infer import infer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny_flux's folder and its transformer as one BFL-layout file."""
    folder = compose_infer(["model=tiny_flux"]).model.path
    pipelines.ensure_weights(compose_infer(["model=tiny_flux"]).model)
    return folder, save_single_file_flux(folder, tmp_path_factory.mktemp("single") / "flux1-tiny.safetensors")


def realigned(pipe):
    """Every weight copied into memory torch allocates: the folder's are memory-mapped at the file's offsets, and on
    one thread CPU kernels take other vector paths on other alignments (see test_twins.py)."""
    for component in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        for tensor in (*component.parameters(), *component.buffers()):
            tensor.data = tensor.data.clone()
    return pipe


def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red car", num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_bfl_file_loads_to_the_folders_weights_and_pixels(checkpoint):
    folder, path = checkpoint
    with safe_open(str(path), framework="pt") as file:
        keys = set(file.keys())
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight", "final_layer.linear.bias",
            "double_blocks.0.img_attn.norm.query_norm.scale", "guidance_in.in_layer.weight"} <= keys
    assert not any(key.startswith(("transformer_blocks", "vae", "text_encoder")) for key in keys)
    cfg = compose_infer(["model=tiny_flux", f"model.path={path}"])
    assert cfg.model.single_file_config == folder  # the twin's config names its folder for the rest
    check_inputs(cfg)
    from_file = pipelines.load_pipeline(cfg.model, torch.device("cpu"), torch.float32)
    from_folder = pipelines.load_pipeline(compose_infer(["model=tiny_flux"]).model, torch.device("cpu"), torch.float32)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), f"{name}: weights changed"
    np.testing.assert_array_equal(sample(realigned(from_file)), sample(realigned(copy.deepcopy(from_folder))))


def test_infer_with_a_bfl_file(checkpoint, tmp_path):
    """The whole run: same image as the folder to within rounding (the folder's weights are memory-mapped, see
    realigned; differences are below one level)."""
    _, path = checkpoint
    [single] = infer(compose_infer(["model=tiny_flux", f"model.path={path}", "prompt=a red car"], output_dir=tmp_path / "a"))
    [folder] = infer(compose_infer(["model=tiny_flux", "prompt=a red car"], output_dir=tmp_path / "b"))
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (single, folder))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() <= 1


def test_bfl_layout_is_diffusers_converters_inverse_at_real_sizes():
    """At FLUX.1's real row counts (3072 wide, linear1 3 x 3072 + 12288), diffusers'
    convert_flux_transformer_checkpoint_to_diffusers reads synth's BFL layout back to the same state dict.
    (Its split sizes are written in, so it cannot read the twin's; the columns do not matter to it: 2 here.)"""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    state_dict = {key: torch.randn(value.shape[0], *([2] if value.dim() > 1 else []), generator=generator)
                  for key, value in model.state_dict().items()}
    bfl = to_bfl_state_dict(state_dict, 2, 2)
    assert bfl["single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 12288
    back = convert_flux_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in bfl.items()})
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[key], state_dict[key]) for key in state_dict)
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    ours = from_bfl_state_dict(bfl, shapes, 2, 2, "test")
    assert all(torch.equal(ours[key], state_dict[key]) for key in state_dict)


def test_files_that_do_not_fit_are_refused_in_one_line(checkpoint, tmp_path):
    folder, path = checkpoint
    tensors = load_file(path)

    def refused(name, changed, message):
        bad = tmp_path / f"{name}.safetensors"
        save_file(changed, bad)
        cfg = compose_infer(["model=tiny_flux", f"model.path={bad}"])
        with pytest.raises(ValueError, match=message) as error:
            pipelines.load_pipeline(cfg.model, torch.device("cpu"), torch.float32)
        assert "\n" not in str(error.value)

    refused("all_in_one", {**tensors, "vae.decoder.conv_in.weight": torch.zeros(1)},
            r"1 tensors are not FLUX.1 transformer weights in BFL's layout \(e.g. 'vae.decoder.conv_in.weight'\)")
    refused("narrow", {**tensors, "single_blocks.0.linear1.weight": tensors["single_blocks.0.linear1.weight"][:96]},
            r"tensor 'single_blocks.0.linear1.weight' has shape \(96, 32\), which does not fit")
    refused("missing", {k: v for k, v in tensors.items() if not k.startswith("double_blocks.1.")},
            r"has no tensor 'double_blocks.1.img_attn.qkv.weight'; it is not a FLUX.1 transformer of this config's size")
    with pytest.raises(ValueError, match=r"model.single_file_config=None: a single-file checkpoint"):
        check_inputs(compose_infer(["model=flux", f"model.path={path}", "model.single_file_config=null"]))
    with pytest.raises(ValueError, match=r"only .safetensors single-file checkpoints"):
        check_inputs(compose_infer(["model=tiny_flux", "model.path=/tmp/flux1-dev.ckpt"]))
