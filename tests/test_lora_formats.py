"""LoRA files made elsewhere: kohya/A1111 (LoCon, DoRA, SGM names), LyCORIS LoHa and LoKr, text-encoder-only files,
SD3's kohya and ComfyUI forms and the official Hunyuan-DiT form, each written here from the format's published key
layout with random tensors for the tiny twins, and checked against diffusers' own loader or the base weights
merged by the format's formula."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_infer
from safetensors.torch import load_file, save_file

from synth import pipelines
from synth.families import get_family
from synth.loras import check_lora_fits, load_loras
from synth.prompt_encoding import prompt_kwargs

TOLERANCE = 1e-5
# kohya names CLIP layers as the transformers 4 CLIPTextModel did (text_model.encoder...); transformers 5 has
# encoder... at the top, which synth resolves
CLIP_IN_FILES = {"text_encoder": "text_model."}


def fresh(family: str):
    """A newly loaded tiny twin: merged LoRAs change weights in place, so every test starts from the files."""
    return pipelines.load_pipeline(compose_infer([f"model=tiny_{family}"]).model, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def base():
    """family -> a pipeline that no test loads a LoRA into (the base weights and layer names)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = fresh(family)
        return cache[family]
    return get


def weight_of(pipe, component, name):
    layer = getattr(pipe, component).get_submodule(name)
    return getattr(layer, "base_layer", layer).weight.detach().clone()


def clip_layer(pipe, component, name):
    """A CLIP layer's name in this transformers version (text_model.encoder... or, flattened, encoder...)."""
    names = dict(getattr(pipe, component).named_modules())
    return name if name in names else f"text_model.{name}"


def kohya(name: str, prefix: str = "lora_unet_") -> str:
    return prefix + name.replace(".", "_")


def lora_tensors(key, shape, rank=2, alpha=3.0, generator=None):
    """kohya LoRA (LoCon on convs: down carries the kernel, up is 1x1) for a layer of weight shape."""
    out, rest = shape[0], shape[1:]
    down = torch.randn(rank, *rest, generator=generator) * 0.2
    up = torch.randn(out, rank, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.2
    delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / rank)
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}, delta


def loha_tensors(key, shape, rank=2, alpha=1.0, generator=None, tucker=False):
    """LyCORIS LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha/rank; with Tucker cores for a conv kernel."""
    g = dict(generator=generator)
    out, inp = shape[0], shape[1]
    if tucker:
        kh, kw = shape[2:]
        tensors = {f"{key}.hada_w1_a": torch.randn(rank, out, **g), f"{key}.hada_w1_b": torch.randn(rank, inp, **g),
                   f"{key}.hada_t1": torch.randn(rank, rank, kh, kw, **g),
                   f"{key}.hada_w2_a": torch.randn(rank, out, **g), f"{key}.hada_w2_b": torch.randn(rank, inp, **g),
                   f"{key}.hada_t2": torch.randn(rank, rank, kh, kw, **g)}

        def factor(a, b, t):  # sum_ij t[i,j,h,w] b[j,in] a[i,out], by plain loops over the kernel
            result = torch.zeros(out, inp, kh, kw)
            for h in range(kh):
                for w in range(kw):
                    result[:, :, h, w] = a.T @ t[:, :, h, w] @ b
            return result
        w1 = factor(tensors[f"{key}.hada_w1_a"], tensors[f"{key}.hada_w1_b"], tensors[f"{key}.hada_t1"])
        w2 = factor(tensors[f"{key}.hada_w2_a"], tensors[f"{key}.hada_w2_b"], tensors[f"{key}.hada_t2"])
    else:
        columns = int(np.prod(shape[1:]))
        tensors = {f"{key}.hada_w1_a": torch.randn(out, rank, **g), f"{key}.hada_w1_b": torch.randn(rank, columns, **g),
                   f"{key}.hada_w2_a": torch.randn(out, rank, **g), f"{key}.hada_w2_b": torch.randn(rank, columns, **g)}
        w1 = tensors[f"{key}.hada_w1_a"] @ tensors[f"{key}.hada_w1_b"]
        w2 = tensors[f"{key}.hada_w2_a"] @ tensors[f"{key}.hada_w2_b"]
    tensors = {k: v * 0.3 for k, v in tensors.items()}
    scale3 = 0.3 ** (3 if tucker else 2)  # each Hadamard factor is a product of 2 (3 with a core) scaled tensors
    tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors, (w1 * scale3) * (w2 * scale3) * (alpha / rank)


def kron_reference(w1, w2):
    """kron by its definition: block (i, j) of the result is w1[i, j] * w2."""
    rows = [torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], dim=1) for i in range(w1.shape[0])]
    return torch.cat(rows, dim=0)


def expect_weights(pipe, expected: dict):
    """Each (component, layer) computes as a plain layer with the expected weight (checks peft adapters and merged
    weights alike, through the layer's forward)."""
    for (component, name), weight in expected.items():
        layer = getattr(pipe, component).get_submodule(name)
        base_layer = getattr(layer, "base_layer", layer)
        generator = torch.Generator().manual_seed(0)
        if weight.dim() == 2:
            probe = torch.randn(3, weight.shape[1], generator=generator)
            want = F.linear(probe, weight, base_layer.bias)
        else:
            probe = torch.randn(1, weight.shape[1], 6, 6, generator=generator)
            want = F.conv2d(probe, weight, base_layer.bias, base_layer.stride, base_layer.padding)
        with torch.no_grad():
            got = layer(probe)
        assert torch.allclose(got, want, atol=TOLERANCE, rtol=1e-4), (name, (got - want).abs().max())


def lora_cfg(paths, scales):
    return {"path": [str(p) for p in paths], "scale": list(scales)}


# --- kohya / A1111 ---------------------------------------------------------------------------------------


def test_kohya_sd15_with_locon_and_text_encoder(base, tmp_path):
    """kohya LoRA on attention and a 3x3 conv (LoCon): diffusers' converter loads it; with CLIP layers too, synth
    merges it (diffusers 0.42 drops kohya CLIP attention layers under transformers 5). Either way each layer
    computes W + scale * up @ down * alpha / rank."""
    ref = base("sd15")
    layers = {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): "lora_unet_",
              ("unet", "down_blocks.0.resnets.0.conv1"): "lora_unet_",
              ("text_encoder", "encoder.layers.0.self_attn.q_proj"): "lora_te_",
              ("text_encoder", "encoder.layers.0.mlp.fc1"): "lora_te_"}
    tensors, expected, generator = {}, {}, torch.Generator().manual_seed(1)
    for (component, name), prefix in layers.items():
        weight = weight_of(ref, component, name)
        part, delta = lora_tensors(kohya(CLIP_IN_FILES.get(component, "") + name, prefix), weight.shape,
                                   generator=generator)
        tensors.update(part)
        expected[(component, name)] = weight + 0.7 * delta
    for route, keep in (("diffusers", "lora_unet_"), ("merge", "lora_")):
        path = tmp_path / f"kohya_{route}.safetensors"
        save_file({key: value for key, value in tensors.items() if key.startswith(keep)}, path)
        pipe = fresh("sd15")
        assert check_lora_fits(str(path), pipe, get_family("sd15"))["route"] == route
        load_loras(pipe, get_family("sd15"), lora_cfg([path], [0.7]))
        expect_weights(pipe, {key: value for key, value in expected.items() if keep == "lora_" or key[0] == "unet"})


def sdxl_sgm_file(ref, path, generator):
    """A kohya SDXL file in SGM names (input_blocks/middle_block/output_blocks, lora_te1_/lora_te2_), and the
    diffusers layers it patches; the tiny twin has layers_per_block=1 and blocks Down, CrossAttn, CrossAttn."""
    sgm = {
        "input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_1_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
        "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_4_0_out_layers_3": "up_blocks.2.resnets.0.conv2",
        "time_embed_0": "time_embedding.linear_1",
    }
    tensors, expected = {}, {}
    for name, layer in sgm.items():
        weight = weight_of(ref, "unet", layer)
        part, delta = lora_tensors("lora_unet_" + name, weight.shape, generator=generator)
        tensors.update(part)
        expected[("unet", layer)] = weight + delta
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        layer = clip_layer(ref, component, "encoder.layers.0.self_attn.k_proj")
        weight = weight_of(ref, component, layer)
        part, delta = lora_tensors(kohya("text_model." + layer.removeprefix("text_model."), prefix), weight.shape,
                                   generator=generator)
        tensors.update(part)
        expected[(component, layer)] = weight + delta
    save_file(tensors, path)
    return expected


def test_kohya_sdxl_sgm_names_match_diffusers_and_the_merge(base, tmp_path):
    """The SGM names resolve to the layers diffusers' converter maps them to: diffusers' load and synth's merge of
    the same file give the same effective weights, both W + up @ down * alpha / rank."""
    path = tmp_path / "sgm.safetensors"
    expected = sdxl_sgm_file(base("sdxl"), path, torch.Generator().manual_seed(2))
    unet_only = tmp_path / "sgm_unet.safetensors"
    save_file({k: v for k, v in load_file(path).items() if k.startswith("lora_unet_")}, unet_only)
    through_diffusers = fresh("sdxl")
    assert check_lora_fits(str(unet_only), through_diffusers, get_family("sdxl"))["route"] == "diffusers"
    load_loras(through_diffusers, get_family("sdxl"), lora_cfg([unet_only], [1.0]))
    expect_weights(through_diffusers, {key: value for key, value in expected.items() if key[0] == "unet"})

    from synth.loras import merge_lora

    merged = fresh("sdxl")
    merge_lora(merged, str(path), 1.0, check_lora_fits(str(path), merged, get_family("sdxl"))["modules"])
    expect_weights(merged, expected)


def test_kohya_dora_is_merged_by_its_formula(base, tmp_path):
    """kohya DoRA (dora_scale (1, in): one magnitude per input column): W' = m * (W + dW) / ||W + dW||, and
    scale s blends W + s * (W' - W). diffusers 0.42 drops dora_scale for SD1.5/SDXL, so synth merges it."""
    ref = base("sd15")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    weight = weight_of(ref, "unet", name)
    tensors, delta = lora_tensors(kohya(name), weight.shape, generator=torch.Generator().manual_seed(3))
    magnitude = torch.rand(1, weight.shape[1]) + 0.5
    tensors[kohya(name) + ".dora_scale"] = magnitude
    path = tmp_path / "dora.safetensors"
    save_file(tensors, path)
    patched = weight + delta
    decomposed = patched * (magnitude / patched.norm(dim=0, keepdim=True))
    pipe = fresh("sd15")
    assert check_lora_fits(str(path), pipe, get_family("sd15"))["route"] == "merge"
    load_loras(pipe, get_family("sd15"), lora_cfg([path], [0.5]))
    expect_weights(pipe, {("unet", name): weight + 0.5 * (decomposed - weight)})


# --- LyCORIS LoHa and LoKr -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loha_file(base, tmp_path_factory):
    """A LoHa for SD1.5 on a linear layer and (Tucker form) a 3x3 conv, with the deltas it defines at scale 1."""
    ref = base("sd15")
    generator = torch.Generator().manual_seed(4)
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    conv = "up_blocks.0.resnets.0.conv1"
    tensors, deltas = {}, {}
    for name, tucker in ((linear, False), (conv, True)):
        part, delta = loha_tensors(kohya(name), weight_of(ref, "unet", name).shape, rank=3, alpha=1.5,
                                   generator=generator, tucker=tucker)
        tensors.update(part)
        deltas[("unet", name)] = delta
    path = tmp_path_factory.mktemp("loha") / "loha.safetensors"
    save_file(tensors, path)
    return path, deltas


def test_loha_is_merged_by_its_formula_and_scale_halves_it(base, loha_file):
    path, deltas = loha_file
    ref = base("sd15")
    for scale in (1.0, 0.5):
        pipe = fresh("sd15")
        load_loras(pipe, get_family("sd15"), lora_cfg([path], [scale]))
        expect_weights(pipe, {key: weight_of(ref, *key) + scale * delta for key, delta in deltas.items()})
        change = {key: weight_of(pipe, *key) - weight_of(ref, *key) for key in deltas}
        for key, delta in deltas.items():
            assert torch.allclose(change[key], scale * delta, atol=TOLERANCE)


def test_lokr_full_and_factored(base, tmp_path):
    """LoKr: kron(w1, w2); alpha/rank applies only when a factor is stored as a low-rank product (LyCORIS)."""
    ref = base("sd15")
    generator = torch.Generator().manual_seed(5)
    full_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"  # w1 and w2 whole: alpha ignored
    factored_name = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # w2 = w2_a @ w2_b: alpha / rank
    conv_name = "down_blocks.0.resnets.0.conv2"  # a 3x3 conv: w2 carries the kernel
    tensors, expected = {}, {}
    weight = weight_of(ref, "unet", full_name)
    out, inp = weight.shape
    w1, w2 = torch.randn(2, 2, generator=generator), torch.randn(out // 2, inp // 2, generator=generator) * 0.1
    tensors.update({kohya(full_name) + ".lokr_w1": w1, kohya(full_name) + ".lokr_w2": w2,
                    kohya(full_name) + ".alpha": torch.tensor(7.0)})
    expected[("unet", full_name)] = weight + kron_reference(w1, w2)
    weight = weight_of(ref, "unet", factored_name)
    out, inp = weight.shape
    w1 = torch.randn(4, 2, generator=generator)
    w2_a, w2_b = torch.randn(out // 4, 2, generator=generator) * 0.2, torch.randn(2, inp // 2, generator=generator) * 0.2
    tensors.update({kohya(factored_name) + ".lokr_w1": w1, kohya(factored_name) + ".lokr_w2_a": w2_a,
                    kohya(factored_name) + ".lokr_w2_b": w2_b, kohya(factored_name) + ".alpha": torch.tensor(1.0)})
    expected[("unet", factored_name)] = weight + kron_reference(w1, w2_a @ w2_b) * (1.0 / 2)
    weight = weight_of(ref, "unet", conv_name)
    out, inp, kh, kw = weight.shape
    w1, w2 = torch.randn(2, 1, generator=generator), torch.randn(out // 2, inp, kh, kw, generator=generator) * 0.1
    tensors.update({kohya(conv_name) + ".lokr_w1": w1, kohya(conv_name) + ".lokr_w2": w2})
    expected[("unet", conv_name)] = weight + torch.cat([w1[0, 0] * w2, w1[1, 0] * w2], dim=0)
    path = tmp_path / "lokr.safetensors"
    save_file(tensors, path)
    pipe = fresh("sd15")
    load_loras(pipe, get_family("sd15"), lora_cfg([path], [1.0]))
    expect_weights(pipe, expected)


def test_several_formats_at_once(base, loha_file, tmp_path):
    """A LoHa (merged) and a kohya LoRA (diffusers' adapter) on the same layer, each at its own scale."""
    path, deltas = loha_file
    ref = base("sd15")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    tensors, delta = lora_tensors(kohya(name), weight_of(ref, "unet", name).shape,
                                  generator=torch.Generator().manual_seed(6))
    second = tmp_path / "kohya.safetensors"
    save_file(tensors, second)
    pipe = fresh("sd15")
    load_loras(pipe, get_family("sd15"), lora_cfg([path, second], [0.5, 0.25]))
    key = ("unet", name)
    expect_weights(pipe, {key: weight_of(ref, *key) + 0.5 * deltas[key] + 0.25 * delta})


# --- text-encoder-only files --------------------------------------------------------------------------------


def test_text_encoder_only_file_changes_the_encoding_and_the_image(base, tmp_path):
    ref = base("sd15")
    tensors, generator = {}, torch.Generator().manual_seed(7)
    for index in range(2):
        for proj in ("q_proj", "v_proj", "out_proj"):
            name = f"encoder.layers.{index}.self_attn.{proj}"
            tensors.update(lora_tensors(kohya("text_model." + name, "lora_te_"), weight_of(ref, "text_encoder", name).shape, rank=4,
                                        alpha=4.0, generator=generator)[0])
    tensors = {key: value * (3 if "lora_up" in key else 1) for key, value in tensors.items()}
    path = tmp_path / "te_only.safetensors"
    save_file(tensors, path)
    pipe = fresh("sd15")
    load_loras(pipe, get_family("sd15"), lora_cfg([path], [1.0]))
    ids = ref.tokenizer(["a red fox"], return_tensors="pt", padding="max_length",
                        max_length=ref.tokenizer.model_max_length).input_ids
    with torch.no_grad():
        assert (pipe.text_encoder(ids)[0] - ref.text_encoder(ids)[0]).abs().max() > 1e-3
    model_cfg = compose_infer(["model=tiny_sd15"]).model
    images = []
    for each in (ref, pipe):  # the prompt goes through synth's encoding (synth.prompt_encoding), as infer runs it
        call = prompt_kwargs(each, get_family("sd15"), "a red fox", "", 1.0, model_cfg)
        images.append(each(**call, num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images[0] * 255)
    assert np.abs(images[1] - images[0]).max() > 2


def test_kolors_kohya_text_encoder_and_sgm_unet(base, tmp_path):
    """Kolors: kohya names on ChatGLM's layers (query_key_value) and the SDXL-shaped UNet's SGM names, merged."""
    ref = base("kolors")
    tensors, expected, generator = {}, {}, torch.Generator().manual_seed(8)
    for prefix, component, name, layer in (
            ("lora_te_", "text_encoder", "encoder_layers_0_self_attention_query_key_value",
             "encoder.layers.0.self_attention.query_key_value"),
            ("lora_unet_", "unet", "input_blocks_3_1_transformer_blocks_0_attn2_to_k",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")):
        weight = weight_of(ref, component, layer)
        part, delta = lora_tensors(prefix + name, weight.shape, generator=generator)
        tensors.update(part)
        expected[(component, layer)] = weight + delta
    path = tmp_path / "kolors.safetensors"
    save_file(tensors, path)
    pipe = fresh("kolors")
    assert check_lora_fits(str(path), pipe, get_family("kolors"))["route"] == "merge"
    load_loras(pipe, get_family("kolors"), lora_cfg([path], [1.0]))
    expect_weights(pipe, expected)


# --- SD3 and Hunyuan-DiT ---------------------------------------------------------------------------------------


def test_sd3_kohya_joint_blocks_and_comfyui_alpha(base, tmp_path):
    """kohya SD3 names (SAI's fused qkv: one LoRA for to_q/to_k/to_v, a chunk of rows each) and the ComfyUI form
    (transformer.<diffusers name> with a per-module alpha), both merged at alpha / rank."""
    ref = base("sd3")
    generator = torch.Generator().manual_seed(9)
    targets = [f"transformer_blocks.1.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj")]
    fused = torch.cat([weight_of(ref, "transformer", t) for t in targets])
    tensors, delta = lora_tensors("lora_unet_joint_blocks_1_context_block_attn_qkv", fused.shape, generator=generator)
    expected = {("transformer", t): weight_of(ref, "transformer", t) + part
                for t, part in zip(targets, delta.chunk(3))}
    name = "transformer_blocks.0.attn.to_out.0"
    weight = weight_of(ref, "transformer", name)
    part, delta = lora_tensors(f"transformer.{name}", weight.shape, rank=4, alpha=2.0, generator=generator)
    tensors.update({key.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): value
                    for key, value in part.items()})
    expected[("transformer", name)] = weight + delta  # rank 4, alpha 2: half strength
    path = tmp_path / "sd3.safetensors"
    save_file(tensors, path)
    pipe = fresh("sd3")
    assert check_lora_fits(str(path), pipe, get_family("sd3"))["route"] == "merge"
    load_loras(pipe, get_family("sd3"), lora_cfg([path], [1.0]))
    expect_weights(pipe, expected)


def test_sd3_diffusers_form_is_diffusers_own_load(base, tmp_path):
    ref = base("sd3")
    name = "transformer_blocks.0.attn.to_q"
    weight = weight_of(ref, "transformer", name)
    generator = torch.Generator().manual_seed(10)
    tensors = {f"transformer.{name}.lora_A.weight": torch.randn(4, weight.shape[1], generator=generator),
               f"transformer.{name}.lora_B.weight": torch.randn(weight.shape[0], 4, generator=generator) * 0.1}
    path = tmp_path / "sd3_diffusers.safetensors"
    save_file(tensors, path)
    ours, theirs = fresh("sd3"), fresh("sd3")
    load_loras(ours, get_family("sd3"), lora_cfg([path], [1.0]))
    theirs.load_lora_weights(str(path))
    for component, layer in [("transformer", name)]:
        got = weight_of(ours, component, layer)
        assert torch.equal(got, weight_of(theirs, component, layer))
    expect_weights(ours, {("transformer", name): weight + tensors[f"transformer.{name}.lora_B.weight"]
                          @ tensors[f"transformer.{name}.lora_A.weight"]})


def hunyuan_official_file(ref, path, generator):
    """The official HunyuanDiT LoRA form: peft names on Tencent's model (blocks.N.attn1.Wqkv, attn2.kv_proj)."""
    tensors, expected = {}, {}
    for original, targets in (("blocks.1.attn1.Wqkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
                              ("blocks.2.attn2.kv_proj", ("attn2.to_k", "attn2.to_v")),
                              ("blocks.0.attn2.out_proj", ("attn2.to_out.0",))):
        block = original.split(".")[1]
        layers = [f"blocks.{block}.{t}" for t in targets]
        fused = torch.cat([weight_of(ref, "transformer", layer) for layer in layers])
        a = torch.randn(4, fused.shape[1], generator=generator) * 0.3
        b = torch.randn(fused.shape[0], 4, generator=generator) * 0.3
        tensors[f"base_model.model.{original}.lora_A.weight"] = a
        tensors[f"base_model.model.{original}.lora_B.weight"] = b
        for layer, part in zip(layers, (b @ a).chunk(len(layers))):
            expected[("transformer", layer)] = weight_of(ref, "transformer", layer) + part  # no alpha: scale 1
    save_file(tensors, path)
    return expected


def test_hunyuan_official_form(base, tmp_path):
    path = tmp_path / "hunyuan.safetensors"
    expected = hunyuan_official_file(base("hunyuan_dit"), path, torch.Generator().manual_seed(11))
    pipe = fresh("hunyuan_dit")
    load_loras(pipe, get_family("hunyuan_dit"), lora_cfg([path], [1.0]))
    expect_weights(pipe, expected)


# --- refusals ---------------------------------------------------------------------------------------------------


def test_wrong_family_and_garbage_are_refused(base, tmp_path):
    sdxl_file = tmp_path / "sdxl.safetensors"
    sdxl_sgm_file(base("sdxl"), sdxl_file, torch.Generator().manual_seed(12))
    with pytest.raises(ValueError, match=r"sdxl.safetensors: looks made for sdxl \(keys lora_te1_\*/lora_te2_\*.*\), "
                                         r"not sd15"):
        check_lora_fits(str(sdxl_file), base("sd15"), get_family("sd15"))
    hunyuan_file = tmp_path / "hunyuan.safetensors"
    hunyuan_official_file(base("hunyuan_dit"), hunyuan_file, torch.Generator().manual_seed(13))
    with pytest.raises(ValueError, match="looks made for hunyuan_dit .*, not sd3"):
        check_lora_fits(str(hunyuan_file), base("sd3"), get_family("sd3"))

    garbage = tmp_path / "garbage.safetensors"
    save_file({"model.diffusion_model.weight": torch.zeros(2, 2)}, garbage)
    with pytest.raises(ValueError, match="1 keys are in no LoRA format synth reads"):
        check_lora_fits(str(garbage), base("sd15"), get_family("sd15"))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}, unknown)
    with pytest.raises(ValueError, match="none of its layers is a layer of this sd15 model .*'lora_unet_no_such_layer'"):
        check_lora_fits(str(unknown), base("sd15"), get_family("sd15"))


def test_shape_mismatch_is_refused(base, tmp_path):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = weight_of(base("sd15"), "unet", name)
    tensors, _ = lora_tensors(kohya(name), (weight.shape[0] + 8, weight.shape[1]))
    path = tmp_path / "wide.safetensors"
    save_file(tensors, path)
    with pytest.raises(ValueError, match="does not fit this sd15 model"):
        check_lora_fits(str(path), base("sd15"), get_family("sd15"))
    tensors = {f"{kohya(name)}.hada_w1_a": torch.zeros(weight.shape[0], 2),
               f"{kohya(name)}.hada_w1_b": torch.zeros(2, weight.shape[1] + 1),
               f"{kohya(name)}.hada_w2_a": torch.zeros(weight.shape[0], 2),
               f"{kohya(name)}.hada_w2_b": torch.zeros(2, weight.shape[1] + 1)}
    save_file(tensors, path)
    with pytest.raises(ValueError, match="does not fit this sd15 model"):
        check_lora_fits(str(path), base("sd15"), get_family("sd15"))


def test_sd35_medium_kohya_attn2(tmp_path):
    """SD3.5 Medium's MMDiT-X second attention (x_block.attn2.qkv, fused) lands on diffusers' attn2.to_q/k/v."""
    pipe = pipelines.load_pipeline(compose_infer(["model=tiny_sd35_medium"]).model, torch.device("cpu"), torch.float32)
    block = next(i for i, b in enumerate(pipe.transformer.transformer_blocks) if getattr(b, "attn2", None) is not None)
    targets = [f"transformer_blocks.{block}.attn2.{p}" for p in ("to_q", "to_k", "to_v")]
    weights = [weight_of(pipe, "transformer", t) for t in targets]
    tensors, delta = lora_tensors(f"lora_unet_joint_blocks_{block}_x_block_attn2_qkv", torch.cat(weights).shape,
                                  generator=torch.Generator().manual_seed(14))
    path = tmp_path / "sd35m.safetensors"
    save_file(tensors, path)
    load_loras(pipe, get_family("sd3"), lora_cfg([path], [1.0]))
    expect_weights(pipe, {("transformer", t): w + part for t, w, part in zip(targets, weights, delta.chunk(3))})


def test_diffusers_form_text_encoder_layers_are_merged(base, tmp_path):
    """diffusers 0.42 drops text-encoder LoRA layers into transformers 5's CLIP; synth merges them (both the
    text_model.encoder... names of older files and encoder...), at the alpha of the peft config in the metadata."""
    ref = base("sdxl")
    tensors, expected, generator = {}, {}, torch.Generator().manual_seed(15)
    for component, file_name, alpha in (("text_encoder", "text_model.encoder.layers.1.self_attn.v_proj", 6),
                                        ("text_encoder_2", "encoder.layers.1.mlp.fc2", 2)):
        layer = clip_layer(ref, component, file_name.removeprefix("text_model."))
        weight = weight_of(ref, component, layer)
        a, b = torch.randn(2, weight.shape[1], generator=generator), torch.randn(weight.shape[0], 2, generator=generator)
        tensors.update({f"{component}.{file_name}.lora_A.weight": a, f"{component}.{file_name}.lora_B.weight": b})
        expected[(component, layer)] = weight + 0.5 * (alpha / 2) * b @ a
    path = tmp_path / "te.safetensors"
    config = {"text_encoder.r": 2, "text_encoder.lora_alpha": 6, "text_encoder_2.r": 2, "text_encoder_2.lora_alpha": 2}
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(config)})
    pipe = fresh("sdxl")
    assert check_lora_fits(str(path), pipe, get_family("sdxl"))["route"] == "merge"
    load_loras(pipe, get_family("sdxl"), lora_cfg([path], [0.5]))
    expect_weights(pipe, expected)


def test_locon_tucker_mid(base, tmp_path):
    """LoCon's Tucker form on a 3x3 conv: down 1x1, lora_mid 3x3, up 1x1, checked against the three convs run in
    sequence beside the base conv."""
    ref = base("sd15")
    name = "up_blocks.1.resnets.0.conv2"
    conv = ref.unet.get_submodule(name)
    generator = torch.Generator().manual_seed(16)
    rank, alpha = 3, 1.5
    down = torch.randn(rank, conv.in_channels, 1, 1, generator=generator) * 0.3
    mid = torch.randn(rank, rank, 3, 3, generator=generator) * 0.3
    up = torch.randn(conv.out_channels, rank, 1, 1, generator=generator) * 0.3
    path = tmp_path / "locon_mid.safetensors"
    save_file({f"{kohya(name)}.lora_down.weight": down, f"{kohya(name)}.lora_mid.weight": mid,
               f"{kohya(name)}.lora_up.weight": up, f"{kohya(name)}.alpha": torch.tensor(alpha)}, path)
    pipe = fresh("sd15")
    load_loras(pipe, get_family("sd15"), lora_cfg([path], [1.0]))
    probe = torch.randn(1, conv.in_channels, 6, 6, generator=generator)
    with torch.no_grad():
        low = F.conv2d(F.conv2d(F.conv2d(probe, down), mid, padding=conv.padding), up)
        want = conv(probe) + low * (alpha / rank)
        got = pipe.unet.get_submodule(name)(probe)
    assert torch.allclose(got, want, atol=TOLERANCE, rtol=1e-4)
