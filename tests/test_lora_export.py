"""LoRA export for other tools: kohya files load in diffusers at the trained strength and their keys resolve
under ComfyUI's and A1111's published key rules; SD3's per-module alpha; Hunyuan-DiT's official fused form
merges to the trained weights; ss_* metadata; `python -m synth.lora convert` round trips and its errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import compose_train

from synth import pipelines
from synth.families import FAMILIES, get_family
from synth.lora import convert, main
from synth.lora_export import KOHYA, sibling_path
from synth.loras import DIFFUSERS_METADATA_KEY, load_loras, read_metadata
from synth.train.lora import ADAPTER, add_lora, export_lora

RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2: a file that drops alpha loads at half (or twice) the strength
SCALE = ALPHA / RANK
KOHYA_FAMILIES = [name for name in FAMILIES if get_family(name).lora_export_form == KOHYA]


class Exported:
    """One family's LoRA as training exports it, with the trained adapter's per-layer weight deltas."""

    def __init__(self, family, folder):
        self.family = get_family(family)
        self.cfg = compose_train([f"model=tiny_{family}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}"],
                                 output_dir=folder)
        self.pipe = pipelines.load_pipeline(self.cfg.model, torch.device("cpu"), torch.float32)
        self.denoiser = getattr(self.pipe, self.family.denoiser)
        torch.manual_seed(0)
        for param in add_lora(self.denoiser, self.cfg.lora, self.family):
            # B starts at zero; random B makes every delta visible. Small: a large random LoRA makes the UNet
            # chaotic, so that float32 rounding alone moves pixels, and with CFG the images saturate to one value.
            param.data = torch.randn_like(param) * 0.05
        self.path = export_lora(folder / "lora.safetensors", self.denoiser, self.cfg, self.family, steps=2,
                                tools_file=True)
        self.tools_path = str(sibling_path(self.path, self.family.lora_export_form))
        self.deltas = deltas(self.denoiser, ADAPTER)

    def fresh(self):
        return pipelines.load_pipeline(self.cfg.model, torch.device("cpu"), torch.float32)


def deltas(model, adapter) -> dict:
    """layer name -> the weight change the adapter makes (peft: B @ A * alpha / rank)."""
    return {name: module.get_delta_weight(adapter).detach() for name, module in model.named_modules()
            if adapter in getattr(module, "lora_A", {})}


class LazyExports(dict):
    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, family):
        self[family] = Exported(family, self.factory.mktemp(family))
        return self[family]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return LazyExports(tmp_path_factory)


def linear_shapes(model) -> dict:
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


# --- diffusers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", KOHYA_FAMILIES)
def test_kohya_file_loads_in_diffusers_at_the_trained_strength(family, exported):
    lora = exported[family]
    fresh = lora.fresh()
    fresh.load_lora_weights(lora.tools_path, adapter_name="kohya")  # plain diffusers, the kohya file
    loaded = deltas(fresh.unet, "kohya")
    assert loaded.keys() == lora.deltas.keys()
    for name, delta in lora.deltas.items():
        torch.testing.assert_close(loaded[name], delta, rtol=0, atol=1e-6)
    layer = next(m for m in fresh.unet.modules() if "kohya" in getattr(m, "scaling", {}))
    assert layer.scaling["kohya"] == pytest.approx(SCALE)


def test_kohya_file_gives_the_trained_pixels(exported):
    lora = exported["sd15"]
    fresh = lora.fresh()
    fresh.load_lora_weights(lora.tools_path)

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a dog", num_inference_steps=2, guidance_scale=1.0, width=64, height=64, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(0)).images[0]

    trained = sample(lora.pipe)
    np.testing.assert_allclose(sample(fresh), trained, atol=1e-5)
    assert np.abs(sample(lora.fresh()) - trained).max() > 1e-2  # and the LoRA does change the image


@pytest.mark.parametrize("family", [name for name in FAMILIES if not get_family(name).peft_loaded])
def test_diffusers_file_still_loads_in_diffusers(family, exported):
    lora = exported[family]
    fresh = lora.fresh()
    fresh.load_lora_weights(lora.path, adapter_name="plain")
    loaded = deltas(getattr(fresh, lora.family.denoiser), "plain")
    assert loaded.keys() == lora.deltas.keys()
    assert all(torch.allclose(loaded[name], delta, atol=1e-6) for name, delta in lora.deltas.items())


# --- ComfyUI and A1111 key rules ------------------------------------------------------------------

# A1111/Forge (extensions-builtin/Lora): diffusers-style kohya UNet names are converted to the SGM UNet's by these
# block patterns (down_blocks_i_attentions_j -> input_blocks_{1+3i+j}_1, mid_block -> middle_block_1,
# up_blocks_i_attentions_j -> output_blocks_{3i+j}_1); a name outside them does not load there.
A1111_UNET_PATTERNS = (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
                       r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
                       r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")


@pytest.mark.parametrize("family", KOHYA_FAMILIES)
def test_kohya_keys_resolve_under_comfyui_and_a1111_rules(family, exported):
    lora = exported[family]
    # ComfyUI's key map: for every UNet weight, "lora_unet_" + its diffusers name with "." -> "_".
    comfy = {"lora_unet_" + name.replace(".", "_"): shape for name, shape in linear_shapes(lora.fresh().unet).items()}
    with safe_open(lora.tools_path, framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    modules = {key.split(".")[0] for key in tensors}
    assert len(modules) == len(lora.deltas)
    for module in modules:
        assert module in comfy, module
        in_features, out_features = comfy[module]
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        assert down.shape == (RANK, in_features) and up.shape == (out_features, RANK)
        assert float(tensors[f"{module}.alpha"]) / down.shape[0] == pytest.approx(SCALE)
        assert any(re.fullmatch(pattern, module) for pattern in A1111_UNET_PATTERNS), module
    assert set(tensors) == {f"{m}.{kind}" for m in modules for kind in ("lora_down.weight", "lora_up.weight", "alpha")}


def test_sd3_comfyui_file_has_per_module_alpha(exported):
    lora = exported["sd3"]
    shapes = linear_shapes(lora.fresh().transformer)
    tensors = load_file(lora.tools_path)
    modules = {key.rpartition(".lora_")[0] for key in tensors if ".lora_" in key}
    assert len(modules) == len(lora.deltas)
    for module in modules:
        # ComfyUI's SD3 key map: "transformer." + the diffusers name; "<key>.alpha" sets the scale alpha / rank.
        name = module.removeprefix("transformer.")
        assert name in shapes
        assert float(tensors[f"{module}.alpha"]) / tensors[f"{module}.lora_A.weight"].shape[0] == pytest.approx(SCALE)
        merged = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"] * SCALE
        torch.testing.assert_close(merged, lora.deltas[name], rtol=0, atol=1e-6)


def test_hunyuan_official_file_merges_to_the_trained_weights(exported):
    """ComfyUI keys Hunyuan-DiT LoRAs by the original model's weight names under base_model.model.; the original
    fuses attn1's q/k/v (Wqkv) and attn2's k/v (kv_proj) (diffusers' conversion script splits them in this order)."""
    lora = exported["hunyuan_dit"]
    tensors = load_file(lora.tools_path)
    assert all(key.startswith("base_model.model.blocks.") for key in tensors)
    shapes = linear_shapes(lora.fresh().transformer)
    fused = {"attn1.Wqkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn1.out_proj": ("attn1.to_out.0",),
             "attn2.q_proj": ("attn2.to_q",), "attn2.kv_proj": ("attn2.to_k", "attn2.to_v"),
             "attn2.out_proj": ("attn2.to_out.0",)}
    checked = set()
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        target = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        block, layer = re.fullmatch(r"(blocks\.\d+)\.(.+)", target).groups()
        members = [f"{block}.{member}" for member in fused[layer]]
        down, up = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        assert up.shape[0] == sum(shapes[m][1] for m in members) and down.shape[1] == shapes[members[0]][0]
        merged = up @ down * float(tensors[f"base_model.model.{target}.alpha"]) / down.shape[0]  # ComfyUI's formula
        for member, rows in zip(members, merged.split([shapes[m][1] for m in members])):
            torch.testing.assert_close(rows, lora.deltas[member], rtol=0, atol=1e-6)
            checked.add(member)
    assert checked == set(lora.deltas)


# --- metadata -----------------------------------------------------------------------------------------


def test_kohya_training_metadata(exported):
    lora = exported["sd15"]
    for path in (lora.path, lora.tools_path):
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata()
        assert all(isinstance(value, str) for value in metadata.values())
        assert {k: metadata[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha",
                                         "ss_base_model_version", "ss_resolution", "ss_max_train_steps", "ss_steps",
                                         "ss_output_name", "modelspec.architecture")} == {
            "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0",
            "ss_base_model_version": "sd_v1", "ss_resolution": "(64, 64)", "ss_max_train_steps": "2",
            "ss_steps": "2", "ss_output_name": "lora", "modelspec.architecture": "stable-diffusion-v1/lora"}
        assert float(metadata["ss_learning_rate"]) == lora.cfg.optim.optimizer.lr
        assert metadata["ss_sd_model_name"] == str(lora.cfg.model.path)
        assert read_metadata(path)["family"] == "sd15" and read_metadata(path)["alpha"] == ALPHA
    with safe_open(lora.tools_path, framework="pt") as file:
        assert DIFFUSERS_METADATA_KEY not in file.metadata()  # diffusers refuses a kohya file with a LoraConfig


# --- convert ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd3", "hunyuan_dit"])
def test_convert_round_trips(family, exported, tmp_path):
    lora = exported[family]
    there = convert(lora.path, str(tmp_path / "there.safetensors"), "comfyui")
    assert load_file(there).keys() == load_file(lora.tools_path).keys()
    back = convert(there, str(tmp_path / "back.safetensors"), "diffusers")
    original, returned = load_file(lora.path), load_file(back)
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[key], returned[key]) for key in original)
    with safe_open(back, framework="pt") as file:
        config = json.loads(file.metadata()[DIFFUSERS_METADATA_KEY])
    prefix = lora.family.denoiser
    assert config[f"{prefix}.r"] == RANK and config[f"{prefix}.lora_alpha"] == ALPHA
    assert read_metadata(back)["family"] == family


def test_converted_kohya_file_loads_in_synth(exported, tmp_path):
    """A kohya file (no synth or diffusers metadata) -> diffusers' form: synth's loader applies it at alpha/rank."""
    lora = exported["sd15"]
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file(load_file(lora.tools_path), bare)  # as a kohya trainer would write it: no metadata
    out = convert(str(bare), str(tmp_path / "diffusers.safetensors"), "diffusers")
    fresh = lora.fresh()
    load_loras(fresh, lora.family, {"path": out, "scale": 1.0})
    loaded = deltas(fresh.unet, "lora0")
    assert all(torch.allclose(loaded[name], delta, atol=1e-6) for name, delta in lora.deltas.items())
    assert convert(out, str(tmp_path / "kohya.safetensors"), "kohya")
    assert all(torch.equal(load_file(lora.tools_path)[k], v) for k, v in load_file(tmp_path / "kohya.safetensors").items())


def test_convert_errors(exported, tmp_path, capsys):
    lora = exported["sd15"]
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    cases = {
        (str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors"), "kohya"): "IN=.*missing.safetensors: no such file",
        (lora.path, str(tmp_path / "o.safetensors"), "a1111"): "--to=a1111: use one of kohya, comfyui, diffusers",
        (lora.path, str(existing), "kohya"): "OUT=.*existing.safetensors: already exists; pass --overwrite",
        (lora.path, str(tmp_path / "o.txt"), "kohya"): "OUT=.*o.txt: must end in .safetensors",
        (exported["sd3"].path, str(tmp_path / "o.safetensors"), "kohya"): "--to=kohya: this LoRA is for sd3",
    }
    for (source, target, to), message in cases.items():
        assert main(["convert", source, target, "--to", to]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and re.search(message, error), error
    assert existing.read_bytes() == b"keep"
    assert main(["convert", lora.path, str(tmp_path / "o.safetensors"), "--to", "kohya", "--family", "sd9"]) == 2
    assert "--family=sd9: not a family" in capsys.readouterr().err
    assert main(["convert", lora.path, str(existing), "--to", "kohya", "--overwrite"]) == 0
    assert load_file(existing).keys() == load_file(lora.tools_path).keys()


def test_convert_command_line(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "synth.lora", "convert", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "--to" in help_run.stdout and "--overwrite" in help_run.stdout
    missing = subprocess.run([sys.executable, "-m", "synth.lora", "convert", "a.safetensors"], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "OUT" in missing.stderr
