"""FLUX LoRA files in BFL's (original) names: kohya sd-scripts' (lora_unet_double_blocks_0_img_attn_qkv) and
ComfyUI's dotted form (diffusion_model.double_blocks.0.img_attn.qkv), each written here from the published layout
out of one random diffusers-format LoRA on every linear layer of tiny_flux, and compared with that file through
both of synth's routes (renamed for diffusers' loader, and merged); the shared fused-layer machinery with unequal
rows (single blocks' linear1) and DoRA; the kohya export; and diffusers' own converter at FLUX.1's real sizes."""

import json

import numpy as np
import pytest
import torch
from conftest import compose_infer
from safetensors.torch import load_file, save_file

from synth import pipelines
from synth.families import get_family
from synth.loras import DIFFUSERS_METADATA_KEY, check_lora_fits, load_loras, merge_lora

FLUX = get_family("flux")
RANK, ALPHA = 4, 2.0  # alpha / rank = 0.5: a reader that drops alpha gives twice the strength

# The published layout, written out here independently of synth's tables: BFL layer -> diffusers members (rows
# stacked in this order; final_layer's adaLN holds shift, scale where diffusers' norm_out holds scale, shift).
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "txt_attn.proj": ("attn.to_add_out",), "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
          "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
          "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation.lin": ("norm.linear",)}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
       "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
       "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
       "final_layer.linear": "proj_out"}
FINAL_ADALN = "final_layer.adaLN_modulation.1"


def bfl_layout(transformer) -> dict:
    """BFL layer -> its diffusers members, for the blocks this transformer has."""
    layout = {name: (member,) for name, member in TOP.items()}
    for block in range(transformer.config.num_layers):
        layout.update({f"double_blocks.{block}.{name}": tuple(f"transformer_blocks.{block}.{m}" for m in members)
                       for name, members in DOUBLE.items()})
    for block in range(transformer.config.num_single_layers):
        layout.update({f"single_blocks.{block}.{name}": tuple(f"single_transformer_blocks.{block}.{m}" for m in members)
                       for name, members in SINGLE.items()})
    return layout


def fresh():
    """A newly loaded tiny_flux: merged LoRAs change weights in place, so every use starts from the files."""
    return pipelines.load_pipeline(compose_infer(["model=tiny_flux"]).model, torch.device("cpu"), torch.float32)


def image(pipe):
    out = pipe("a red car", num_inference_steps=2, width=64, height=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return (out.images[0] * 255).round()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random diffusers-format LoRA on every linear layer of tiny_flux's transformer (rank 4, alpha 2), its
    tensors, and the image it gives through diffusers' own loader."""
    folder = tmp_path_factory.mktemp("flux_bfl")
    pipe = fresh()
    generator = torch.Generator().manual_seed(0)
    loras = {}
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            loras[name] = (torch.randn(RANK, module.in_features, generator=generator) * 0.1,
                           torch.randn(module.out_features, RANK, generator=generator) * 0.1)
    tensors = {}
    for name, (a, b) in loras.items():
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = a, b
    config = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": sorted(loras)}
    path = folder / "diffusers.safetensors"
    save_file(tensors, path, metadata={DIFFUSERS_METADATA_KEY: json.dumps(config)})
    assert check_lora_fits(str(path), pipe, FLUX)["route"] == "diffusers"
    load_loras(pipe, FLUX, {"path": str(path), "scale": 1.0})
    layout = bfl_layout(pipe.transformer)
    assert {m for members in layout.values() for m in members} | {"norm_out.linear"} == set(loras), "every layer"
    return {"folder": folder, "loras": loras, "image": image(pipe), "layout": layout,
            "deltas": {name: b @ a * (ALPHA / RANK) for name, (a, b) in loras.items()}}


def bfl_file(reference, path, dotted: bool, down="lora_down", up="lora_up"):
    """The reference LoRA in BFL's names: a fused layer's down matrices stacked, its up matrices block-diagonal
    and its alpha n x ALPHA (alpha / rank unchanged: exact). kohya: lora_unet_<name with _>; ComfyUI:
    diffusion_model.<name>."""
    loras = reference["loras"]
    tensors = {}

    def write(name, down_matrix, up_matrix, alpha):
        key = f"diffusion_model.{name}" if dotted else "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.{down}.weight"], tensors[f"{key}.{up}.weight"] = down_matrix, up_matrix
        tensors[f"{key}.alpha"] = torch.tensor(alpha)

    for name, members in reference["layout"].items():
        downs = [loras[m][0] for m in members]
        ups = [loras[m][1] for m in members]
        block = torch.zeros(sum(u.shape[0] for u in ups), RANK * len(ups))
        row = 0
        for index, u in enumerate(ups):  # unequal rows in linear1: q, k, v, then proj_mlp's 4x
            block[row:row + u.shape[0], index * RANK:(index + 1) * RANK] = u
            row += u.shape[0]
        write(name, torch.cat(downs), block, ALPHA * len(members))
    a, b = loras["norm_out.linear"]
    shift_scale = torch.cat(b.chunk(2)[::-1])  # diffusers' (scale, shift) rows as BFL's (shift, scale)
    write(FINAL_ADALN, a, shift_scale, ALPHA)
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("form", ["kohya", "comfyui_down_up", "comfyui_a_b"])
def test_bfl_names_give_the_diffusers_files_pixels_by_both_routes(reference, form, tmp_path):
    """Renamed for diffusers' loader (switchable adapters): the same adapters as the diffusers file, bit for bit.
    Merged: the same weights to float32 rounding (1e-6 of the weights), and pixels within 1 of 255 (2 steps: the
    adapters' unmerged forward and a merged weight round differently)."""
    names = {"kohya": (False, "lora_down", "lora_up"), "comfyui_down_up": (True, "lora_down", "lora_up"),
             "comfyui_a_b": (True, "lora_A", "lora_B")}[form]
    path = bfl_file(reference, tmp_path / f"{form}.safetensors", *names)

    pipe = fresh()
    plan = check_lora_fits(str(path), pipe, FLUX)
    assert plan["route"] == "renamed" and len(plan["modules"]) == len(reference["layout"]) + 1
    load_loras(pipe, FLUX, {"path": str(path), "scale": 1.0})
    for name, module in pipe.transformer.named_modules():
        if "lora0" in getattr(module, "lora_A", {}):
            torch.testing.assert_close(module.get_delta_weight("lora0"), reference["deltas"][name], rtol=0, atol=0,
                                       msg=name)
    assert np.array_equal(image(pipe), reference["image"])

    merged = fresh()
    base = {name: module.weight.detach().clone() for name, module in merged.transformer.named_modules()
            if isinstance(module, torch.nn.Linear)}
    merge_lora(merged, str(path), 1.0, plan["modules"])
    for name, module in merged.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            torch.testing.assert_close(module.weight, base[name] + reference["deltas"][name], rtol=0, atol=1e-6,
                                       msg=name)
    assert np.abs(image(merged) - reference["image"]).max() <= 1


def test_dense_fused_linear1_splits_by_unequal_rows(tmp_path):
    """A fused LoRA whose up matrix is dense (any kohya LoRA trained on linear1 itself) splits into the members'
    rows 32, 32, 32, 128 exactly, in the renamed route (shared down) and the merge."""
    pipe = fresh()
    members = [f"single_transformer_blocks.1.{m}" for m in SINGLE["linear1"]]
    rows = [pipe.transformer.get_submodule(m).out_features for m in members]
    assert rows == [32, 32, 32, 128]
    generator = torch.Generator().manual_seed(3)
    down, up = torch.randn(8, 32, generator=generator) * 0.1, torch.randn(sum(rows), 8, generator=generator) * 0.1
    path = tmp_path / "linear1.safetensors"
    save_file({"lora_unet_single_blocks_1_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_1_linear1.lora_up.weight": up,
               "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(4.0)}, path)
    deltas = dict(zip(members, (up @ down * 0.5).split(rows)))
    load_loras(pipe, FLUX, {"path": str(path), "scale": 1.0})
    for name in members:
        torch.testing.assert_close(pipe.transformer.get_submodule(name).get_delta_weight("lora0"), deltas[name],
                                   rtol=0, atol=1e-7, msg=name)
    merged = fresh()
    base = {m: merged.transformer.get_submodule(m).weight.detach().clone() for m in members}
    merge_lora(merged, str(path), 1.0, check_lora_fits(str(path), merged, FLUX)["modules"])
    for name in members:
        torch.testing.assert_close(merged.transformer.get_submodule(name).weight, base[name] + deltas[name],
                                   rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("per_row", [False, True])
def test_dora_on_fused_linear1_is_normed_over_the_fused_weight(tmp_path, per_row):
    """DoRA (kohya/LyCORIS dora_scale) on linear1 merges as on BFL's one fused layer: m * (W + dW) / ||W + dW||
    with W the members' rows stacked, per input column (kohya's default) or per output row (wd_on_out)."""
    pipe = fresh()
    members = [f"single_transformer_blocks.0.{m}" for m in SINGLE["linear1"]]
    fused = torch.cat([pipe.transformer.get_submodule(m).weight.detach() for m in members])
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 32, generator=generator) * 0.1, torch.randn(fused.shape[0], 4, generator=generator) * 0.1
    patched = fused + up @ down
    if per_row:
        magnitude = torch.rand(fused.shape[0], 1, generator=generator) + 0.5
        want = patched * magnitude / patched.norm(dim=1, keepdim=True)
    else:
        magnitude = torch.rand(1, fused.shape[1], generator=generator) + 0.5
        want = patched * magnitude / patched.norm(dim=0, keepdim=True)
    path = tmp_path / "dora.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
               "lora_unet_single_blocks_0_linear1.dora_scale": magnitude}, path)
    assert check_lora_fits(str(path), pipe, FLUX)["route"] == "merge"  # diffusers drops dora_scale
    load_loras(pipe, FLUX, {"path": str(path), "scale": 1.0})
    got = torch.cat([pipe.transformer.get_submodule(m).weight.detach() for m in members])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_text_encoder_layers_in_a_bfl_file_are_merged(reference, tmp_path):
    """kohya's FLUX files may train CLIP-L (lora_te1_): the whole file merges (diffusers drops such layers)."""
    pipe = fresh()
    name = next(n for n, m in pipe.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    layer = pipe.text_encoder.get_submodule(name)
    tensors = load_file(bfl_file(reference, tmp_path / "k.safetensors", dotted=False))
    generator = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, layer.in_features, generator=generator), torch.randn(layer.out_features, 2, generator=generator)
    kohya_name = "lora_te1_text_model_" + name.removeprefix("text_model.").replace(".", "_")
    tensors.update({f"{kohya_name}.lora_down.weight": down, f"{kohya_name}.lora_up.weight": up,
                    f"{kohya_name}.alpha": torch.tensor(1.0)})
    path = tmp_path / "with_clip.safetensors"
    save_file(tensors, path)
    before = layer.weight.detach().clone()
    assert check_lora_fits(str(path), pipe, FLUX)["route"] == "merge"
    load_loras(pipe, FLUX, {"path": str(path), "scale": 1.0})
    torch.testing.assert_close(layer.weight, before + up @ down * 0.5, rtol=0, atol=1e-6)
    assert np.abs(image(pipe) - reference["image"]).max() > 2  # the CLIP-L change reaches the pooled vector


# --- refusals ---------------------------------------------------------------------------------------------------


def test_a_layer_flux_lacks_or_a_wrong_shape_is_refused_in_one_line(tmp_path):
    pipe = fresh()
    missing = tmp_path / "missing.safetensors"
    save_file({"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(96, 2)}, missing)
    with pytest.raises(ValueError, match=r"none of its layers is a layer of this flux model \(e\.g\. "
                                         r"'lora_unet_double_blocks_7_img_attn_qkv'") as error:
        check_lora_fits(str(missing), pipe, FLUX)
    assert "\n" not in str(error.value)
    no_such = tmp_path / "no_such.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkvx.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.double_blocks.0.img_attn.qkvx.lora_B.weight": torch.zeros(96, 2)}, no_such)
    with pytest.raises(ValueError, match="'diffusion_model.double_blocks.0.img_attn.qkvx'"):
        check_lora_fits(str(no_such), pipe, FLUX)
    narrow = tmp_path / "narrow.safetensors"  # linear1 without proj_mlp's rows: 96, not 224
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(96, 2)}, narrow)
    with pytest.raises(ValueError, match=r"'lora_unet_single_blocks_0_linear1' makes a 96 x 32 change, which does not "
                                         r"fit this flux model's 'single_transformer_blocks.0.attn.to_q\+.*\.proj_mlp' "
                                         r"\(224 x 32\)") as error:
        check_lora_fits(str(narrow), pipe, FLUX)
    assert "\n" not in str(error.value)


def test_a_flux_file_for_another_family_is_named(reference, tmp_path):
    path = bfl_file(reference, tmp_path / "kohya.safetensors", dotted=False)
    sd15 = pipelines.load_pipeline(compose_infer(["model=tiny_sd15"]).model, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="looks made for flux .*not sd15; use it with model=flux"):
        check_lora_fits(str(path), sd15, get_family("sd15"))


# --- diffusers' own converter, at FLUX.1's real sizes -------------------------------------------------------------


def real_flux_linears() -> dict:
    """Linear layer -> (in, out) of FLUX.1 [dev]'s transformer with one block of each kind (on the meta device)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def test_synths_reading_of_kohya_names_matches_diffusers_converter_at_real_sizes():
    """At FLUX.1's sizes (3072 wide, linear1 split 3072 x 3 + 12288), diffusers' _convert_kohya_flux_lora_to_diffusers
    reads kohya files; synth's reading (from_kohya, the names and splits every route uses) gives the same change on
    every layer. (diffusers' converter has those sizes written in, so it cannot read the twin's linear1.)"""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from synth.lora_export import from_kohya

    shapes = real_flux_linears()
    layout = {name: (member,) for name, member in TOP.items()}
    layout.update({f"double_blocks.0.{n}": tuple(f"transformer_blocks.0.{m}" for m in ms) for n, ms in DOUBLE.items()})
    layout.update({f"single_blocks.0.{n}": tuple(f"single_transformer_blocks.0.{m}" for m in ms)
                   for n, ms in SINGLE.items()})
    generator = torch.Generator().manual_seed(6)
    tensors = {}
    for name, members in layout.items():
        rows = sum(shapes[m][1] for m in members)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, shapes[members[0]][0], generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(rows, 2, generator=generator)
        # alpha / rank 0.5; final_layer's alpha is dropped by diffusers' converter (its "TODO: alphas"), so rank there
        tensors[f"{key}.alpha"] = torch.tensor(2.0 if name.startswith("final_layer") else 1.0)

    probes = {width: torch.randn(width, 3, generator=generator) for width in {shape[0] for shape in shapes.values()}}

    def changes(state_dict, alphas):
        """layer -> its change applied to a probe, B @ (A @ probe) * alpha / rank (the full products are large)."""
        return {key.removeprefix("transformer.").removesuffix(".lora_A.weight"):
                state_dict[key.replace("lora_A", "lora_B")] @ (value @ probes[value.shape[1]])
                * alphas.get(key.removesuffix(".lora_A.weight"), value.shape[0]) / value.shape[0]
                for key, value in state_dict.items() if key.endswith(".lora_A.weight")}

    theirs = changes(_convert_kohya_flux_lora_to_diffusers(dict(tensors)), {})  # alpha folded into the weights
    ours = changes(*from_kohya(tensors, FLUX))
    assert set(ours) == set(theirs) == {m for ms in layout.values() for m in ms}
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)


# --- the kohya export -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random FLUX LoRA on the family's training targets (to_q, to_k, to_v, to_out.0), exported as training
    does, with the image the trained adapter gives."""
    from train_utils import compose_train

    from synth.train.lora import add_lora, export_lora

    folder = tmp_path_factory.mktemp("flux_export")
    cfg = compose_train(["model=tiny_flux", "lora.rank=4", "lora.alpha=8.0"], output_dir=folder)
    pipe = pipelines.load_pipeline(cfg.model, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    for param in add_lora(pipe.transformer, cfg.lora, FLUX):
        param.data = torch.randn_like(param) * 0.05
    path = export_lora(folder / "lora.safetensors", pipe.transformer, cfg, FLUX, steps=2, tools_file=True)
    deltas = {name: module.get_delta_weight(next(iter(module.lora_A))).detach()
              for name, module in pipe.transformer.named_modules() if getattr(module, "lora_A", None)}
    return {"path": path, "kohya": folder / "lora.kohya.safetensors", "image": image(pipe), "deltas": deltas,
            "folder": folder}


def adapter_deltas(model, adapter) -> dict:
    return {name: module.get_delta_weight(adapter).detach() for name, module in model.named_modules()
            if adapter in getattr(module, "lora_A", {})}


def test_export_writes_bfl_kohya_names_that_reimport_to_the_trained_pixels(trained):
    from safetensors import safe_open

    assert not (trained["folder"] / "lora.comfyui.safetensors").exists()  # ComfyUI reads the kohya file
    tensors = load_file(trained["kohya"])
    modules = [f"lora_unet_double_blocks_{b}_img_attn_{n}" for b in (0, 1) for n in ("qkv", "proj")]
    modules += [f"lora_unet_single_blocks_{b}_linear1" for b in (0, 1)]
    assert set(tensors) == {f"{m}.{p}" for m in modules for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    # linear1: to_q, to_k, to_v trained (rank 4 each, block-diagonal), proj_mlp's 128 rows zero
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (32 * 3 + 128, 12) and not up[96:].any() and not up[:32, 4:].any()
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 24.0  # 3 x 8: alpha / rank stays 2
    with safe_open(str(trained["kohya"]), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["ss_base_model_version"] == "flux1" and DIFFUSERS_METADATA_KEY not in metadata

    pipe = fresh()
    assert check_lora_fits(str(trained["kohya"]), pipe, FLUX)["route"] == "renamed"
    load_loras(pipe, FLUX, {"path": str(trained["kohya"]), "scale": 1.0})
    loaded = adapter_deltas(pipe.transformer, "lora0")
    assert loaded.keys() >= trained["deltas"].keys()
    for name, delta in trained["deltas"].items():
        torch.testing.assert_close(loaded[name], delta, rtol=0, atol=0, msg=name)
    assert np.array_equal(image(pipe), trained["image"])


def test_diffusers_own_loader_reads_the_kohya_export(trained, tmp_path):
    """diffusers' load_lora_weights reads the exported file: on the twin for the double blocks (its converter splits
    linear1 at FLUX.1's real widths, written in), and at FLUX.1's real sizes for every layer, from the same export."""
    from diffusers import FluxPipeline

    from synth.lora_export import to_kohya_fused

    double = tmp_path / "double.safetensors"
    save_file({k: v for k, v in load_file(trained["kohya"]).items() if "double_blocks" in k}, double)
    theirs = fresh()
    theirs.load_lora_weights(str(double), adapter_name="kohya")
    loaded = adapter_deltas(theirs.transformer, "kohya")
    assert loaded and all(name.startswith("transformer_blocks.") for name in loaded)
    for name, delta in loaded.items():
        torch.testing.assert_close(delta, trained["deltas"][name], rtol=1e-6, atol=1e-7, msg=name)

    shapes = real_flux_linears()
    generator = torch.Generator().manual_seed(7)
    tensors, alphas = {}, {}
    for name in [n for n in shapes if n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")]:
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(2, shapes[name][0], generator=generator)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(shapes[name][1], 2, generator=generator)
        alphas[f"transformer.{name}"] = 1.0
    kohya = to_kohya_fused(tensors, alphas, FLUX)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    state_dict = FluxPipeline.lora_state_dict(kohya)
    probe = {width: torch.randn(width, 3, generator=generator) for width in {s[0] for s in shapes.values()}}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            got = state_dict[key.replace("lora_A", "lora_B")] @ (state_dict[key] @ probe[a.shape[1]])
            torch.testing.assert_close(got, b @ (a @ probe[a.shape[1]]) * 0.5, rtol=1e-5, atol=1e-4, msg=key)


def test_convert_to_kohya_and_back(trained, tmp_path):
    from synth.lora import convert

    kohya = convert(str(trained["path"]), str(tmp_path / "kohya.safetensors"), "kohya")
    exported, converted = load_file(trained["kohya"]), load_file(kohya)
    assert exported.keys() == converted.keys()
    assert all(torch.equal(exported[key], converted[key]) for key in exported)
    comfyui = convert(str(trained["path"]), str(tmp_path / "comfyui.safetensors"), "comfyui")
    assert load_file(comfyui).keys() == exported.keys()  # ComfyUI's form for FLUX is the same file
    bare = tmp_path / "bare.safetensors"
    save_file(exported, bare)  # as kohya's trainer or civitai would have it: no synth or diffusers metadata
    back = convert(str(bare), str(tmp_path / "back.safetensors"), "diffusers")
    returned, original = load_file(back), load_file(trained["path"])
    assert returned.keys() >= original.keys()  # plus proj_mlp's all-zero LoRA (its rows of linear1 are zero)
    pipe = fresh()
    load_loras(pipe, FLUX, {"path": back, "scale": 1.0})
    loaded = adapter_deltas(pipe.transformer, "lora0")
    for name, delta in trained["deltas"].items():
        torch.testing.assert_close(loaded[name], delta, rtol=0, atol=1e-7, msg=name)
    assert not any(loaded[name].any() for name in set(loaded) - set(trained["deltas"]))


def test_renamed_adapters_stay_switchable(reference, tmp_path):
    """A kohya file beside the diffusers file: two adapters, each at its own scale (the kohya one at 0 adds
    nothing, so the image is the diffusers file's alone), as diffusers' set_adapters switches them."""
    kohya = bfl_file(reference, tmp_path / "kohya.safetensors", dotted=False)
    pipe = fresh()
    load_loras(pipe, FLUX, {"path": [str(reference["folder"] / "diffusers.safetensors"), str(kohya)], "scale": [1.0, 0.0]})
    assert set(pipe.get_list_adapters()["transformer"]) == {"lora0", "lora1"}
    assert np.array_equal(image(pipe), reference["image"])
    pipe.set_adapters(["lora1"], adapter_weights=[1.0])
    assert np.array_equal(image(pipe), reference["image"])
