"""LoRAs at inference: lora.path / lora.scale for every family, several at once, image-to-image, and refusals."""


import numpy as np
import pytest
import torch
from conftest import compose_infer, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from train_utils import compose_train

from synth import pipelines
from synth.checks import check_inputs
from synth.families import FAMILIES as REGISTRY
from synth.families import get_family
from synth.infer import infer
from synth.train.lora import add_lora, export_lora

FAMILIES = list(REGISTRY)


def make_lora(family: str, path, seed: int = 0, rank: int = 4, alpha: float = 8.0):
    """A LoRA file as training writes it, with random (not zero) B matrices so that it visibly changes images."""
    cfg = compose_train([f"model=tiny_{family}", f"lora.rank={rank}", f"lora.alpha={alpha}"], output_dir=path.parent)
    pipe = pipelines.load_pipeline(cfg.model, torch.device("cpu"), torch.float32)
    denoiser = getattr(pipe, get_family(family).denoiser)
    torch.manual_seed(seed)
    for param in add_lora(denoiser, cfg.lora, get_family(family)):
        param.data = torch.randn_like(param) * 0.3
    return export_lora(path, denoiser, cfg, get_family(family))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def generate(tmp_path, *overrides):
    return pixels(infer(compose_infer(list(overrides), output_dir=tmp_path))[0])


class LazyLoras(dict):
    """family -> LoRA file, made on first use (each costs a pipeline load)."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __missing__(self, family):
        self[family] = make_lora(family, self.folder / f"{family}.safetensors")
        return self[family]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return LazyLoras(tmp_path_factory.mktemp("loras"))


# sd15 takes diffusers' loader, hunyuan_dit synth's peft one; the rest share sd15's path (their files load with
# plain diffusers in test_train.py) and run with -m slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "family", ["sd15", "hunyuan_dit", *(pytest.param(f, marks=SLOW) for f in ("sdxl", "sd3", "kolors"))]
)
def test_lora_changes_the_image(family, loras, tmp_path):
    base = generate(tmp_path / "base", f"model=tiny_{family}")
    with_lora = generate(tmp_path / "lora", f"model=tiny_{family}", f"lora.path={loras[family]}", "lora.scale=1.0")
    assert np.abs(with_lora - base).max() > 2


@pytest.mark.slow
def test_scale_zero_gives_the_base_image(loras, tmp_path):
    base = generate(tmp_path / "base", "model=tiny_sd15")
    off = generate(tmp_path / "off", "model=tiny_sd15", f"lora.path={loras['sd15']}", "lora.scale=0.0")
    assert np.abs(off - base).max() <= 1


def test_several_loras_at_once(tmp_path):
    first = make_lora("sd15", tmp_path / "a.safetensors", seed=1)
    second = make_lora("sd15", tmp_path / "b.safetensors", seed=2)
    one = generate(tmp_path / "one", "model=tiny_sd15", f"lora.path={first}", "lora.scale=0.8")
    both = generate(tmp_path / "both", "model=tiny_sd15", f"lora.path=[{first},{second}]", "lora.scale=[0.8,0.5]")
    assert np.abs(both - one).max() > 2


@pytest.mark.slow
def test_each_lora_has_its_own_scale(tmp_path):
    first = make_lora("sd15", tmp_path / "a.safetensors", seed=1)
    second = make_lora("sd15", tmp_path / "b.safetensors", seed=2)
    one = generate(tmp_path / "one", "model=tiny_sd15", f"lora.path={first}", "lora.scale=0.8")
    only_first = generate(tmp_path / "only", "model=tiny_sd15", f"lora.path=[{first},{second}]", "lora.scale=[0.8,0]")
    assert np.abs(only_first - one).max() <= 1


@pytest.mark.slow
def test_hunyuan_several_loras_through_peft(tmp_path):
    first = make_lora("hunyuan_dit", tmp_path / "a.safetensors", seed=1)
    second = make_lora("hunyuan_dit", tmp_path / "b.safetensors", seed=2)
    one = generate(tmp_path / "one", "model=tiny_hunyuan_dit", f"lora.path={first}")
    both = generate(tmp_path / "both", "model=tiny_hunyuan_dit", f"lora.path=[{first},{second}]", "lora.scale=[1,0]")
    assert np.abs(both - one).max() <= 1


# Kolors: diffusers' img2img loader fails, synth loads through text-to-image; Hunyuan-DiT: synth's own img2img.
@pytest.mark.parametrize("family", ["kolors", pytest.param("hunyuan_dit", marks=SLOW)])
def test_image_to_image_with_a_lora(family, loras, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    common = [f"model=tiny_{family}", f"init_image={init}", "num_inference_steps=4"]
    base = generate(tmp_path / "base", *common)
    with_lora = generate(tmp_path / "lora", *common, f"lora.path={loras[family]}")
    assert np.abs(with_lora - base).max() > 2


def test_alpha_is_read_from_the_file(tmp_path):
    """rank 4, alpha 8: diffusers must apply scale 2, i.e. the same image as the weights merged by hand."""
    path = make_lora("sd15", tmp_path / "alpha.safetensors", rank=4, alpha=8.0)
    pipe = pipelines.load_pipeline(compose_infer(["model=tiny_sd15"]).model, torch.device("cpu"), torch.float32)
    pipe.load_lora_weights(str(path))
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling[next(iter(layer.scaling))] == pytest.approx(2.0)


def test_lora_for_another_family_is_refused(loras, tmp_path):
    cfg = compose_infer(["model=tiny_sdxl", f"lora.path={loras['sd15']}"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="trained for sd15, not sdxl"):
        check_inputs(cfg)

    # A file without synth's metadata is checked against the model's layers once the model is loaded.
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(loras["sd15"]), foreign, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not fit this sdxl model|sdxl has no layer"):
        infer(compose_infer(["model=tiny_sdxl", f"lora.path={foreign}"], output_dir=tmp_path))
    with pytest.raises(ValueError, match="none of its layers is a layer of this sd3 model"):
        infer(compose_infer(["model=tiny_sd3", f"lora.path={foreign}"], output_dir=tmp_path))


def test_bad_lora_paths_are_refused_before_loading(tmp_path, loras):
    cases = {
        f"lora.path={tmp_path / 'missing.safetensors'}": (FileNotFoundError, "no such file"),
        f"lora.path={tmp_path / 'weights.ckpt'}": (ValueError, "only .safetensors"),
        "lora.scale=[1,2]": (ValueError, "one scale per LoRA"),
    }
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00{")
    cases[f"lora.path={garbage}"] = (ValueError, "not a readable .safetensors")
    for override, (error, message) in cases.items():
        extra = [f"lora.path={loras['sd15']}"] if override.startswith("lora.scale") else []
        cfg = compose_infer(["model=tiny_sd15", *extra, override], output_dir=tmp_path)
        with pytest.raises(error, match=message):
            check_inputs(cfg)


@pytest.mark.slow
def test_cli_verbatim(loras, tmp_path):
    result = run_cli("infer.py", "model=tiny_sd3", f"lora.path={loras['sd3']}", "lora.scale=0.8",
                     f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = list(tmp_path.glob("*.png"))
    assert len(written) == 1
    config = Image.open(written[0]).text
    assert any("lora" in value and "0.8" in value for value in config.values())


def test_cli_refuses_a_lora_for_another_family(loras, tmp_path):
    bad = run_cli("infer.py", "model=tiny_sdxl", f"lora.path={loras['sd3']}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert bad.returncode == 2 and "trained for sd3, not sdxl" in bad.stderr
