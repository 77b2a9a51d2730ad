"""LoRA files in the forms other tools read, kohya's ss_* metadata, and the way back to diffusers' form.

The forms (the family says which its export uses: Family.lora_export_form):
- "kohya": ``lora_unet_<diffusers module path, "." -> "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (text encoders ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``). kohya's sd-scripts writes diffusers-style module
  names; ComfyUI's LoRA key map accepts them for every UNet model (it builds them from its UNet-to-diffusers map),
  A1111/Forge convert them to their own (SGM) names, and diffusers' load_lora_weights reads them with alpha.
- "diffusers_alpha": diffusers' own keys (``transformer.<module>.lora_A.weight``) plus one ``<prefix>.<module>.alpha``
  tensor per module: ComfyUI reads ``<key>.alpha`` for every key form and scales by alpha / rank; without it, it
  applies the LoRA at scale 1 (twice the strength of a rank 4 / alpha 2 LoRA).
- "official_fused": the original checkpoint's LoRA form, ``base_model.model.<original module>.lora_A/B.weight``, on
  the original model's fused layers (the family's `lora_fused_layers`: Hunyuan-DiT's attn1.Wqkv, attn2.kv_proj, ...),
  which ComfyUI's key map reads; diffusers' split to_q/to_k/to_v LoRAs are fused exactly (down stacked, up
  block-diagonal, alpha multiplied so that alpha / rank stays the trained scale), plus per-module ``.alpha``.
- "kohya_fused": kohya names of the original model's layers, fused the same way (``lora_unet_<original module,
  "." -> "_">.lora_down.weight`` / ``lora_up.weight`` / ``alpha``; the family's `lora_original_layers` plans it,
  members of unequal rows allowed): FLUX's BFL names, which kohya sd-scripts' FLUX LoRAs and civitai use and
  ComfyUI and diffusers' Flux loader read.

Tensors here are plain dicts of torch tensors; names of the diffusers form carry the prefix (``unet.``).
"""

from __future__ import annotations

import json
import re

KOHYA, DIFFUSERS_ALPHA, OFFICIAL_FUSED, KOHYA_FUSED = "kohya", "diffusers_alpha", "official_fused", "kohya_fused"
FORMS = (KOHYA, DIFFUSERS_ALPHA, OFFICIAL_FUSED, KOHYA_FUSED)
# lora.<tag>.safetensors: named for who reads it (kohya files: A1111/Forge, ComfyUI, diffusers; the others: ComfyUI)
FILE_TAGS = {KOHYA: "kohya", DIFFUSERS_ALPHA: "comfyui", OFFICIAL_FUSED: "comfyui", KOHYA_FUSED: "kohya"}
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
OFFICIAL_PREFIX = "base_model.model."

# Module-path words that hold an underscore: kohya's "_" for "." must not split them when reading names back.
# (diffusers' UNet2DConditionModel, CLIP text encoders and SD3's MMDiT.)
COMPOUND_NAMES = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks", "to_q", "to_k",
    "to_v", "to_out", "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj", "proj_in", "proj_out",
    "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "linear_1", "linear_2",
    "add_embedding", "encoder_hid_proj", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "ff_context", "norm_out", "proj_mlp",
)

def _modules(tensors: dict) -> dict:
    """diffusers-form tensors -> {"<prefix>.<module>": {"A": down, "B": up}}."""
    modules = {}
    for key, tensor in tensors.items():
        module, _, kind = key.rpartition(".lora_")
        if kind in ("A.weight", "B.weight"):
            modules.setdefault(module, {})[kind[0]] = tensor
    return modules


def module_alphas(tensors: dict, lora_config: dict | None, prefix: str) -> dict:
    """The alpha of each module of a diffusers-form LoRA: from its ``.alpha`` tensors, else from the peft config
    (lora_alpha, alpha_pattern), else the rank (peft's scale 1)."""
    config = lora_config or {}
    alphas = {}
    for module, pair in _modules(tensors).items():
        if f"{module}.alpha" in tensors:
            alphas[module] = float(tensors[f"{module}.alpha"])
            continue
        name = module.removeprefix(prefix + ".")
        pattern = {k: v for k, v in (config.get("alpha_pattern") or {}).items() if name == k or name.endswith("." + k)}
        alphas[module] = float(next(iter(pattern.values()), config.get("lora_alpha", pair["A"].shape[0])))
    return alphas


# --- diffusers form -> the tools' forms -------------------------------------------------------------


def to_kohya(tensors: dict, alphas: dict) -> dict:
    """diffusers-form LoRA tensors -> kohya names with each module's trained alpha.

    diffusers' convert_state_dict_to_kohya does the renaming, but writes alpha = rank for every module (the
    LoRA then loads at rank / alpha times its trained strength wherever alpha != rank) and names SD1.x's single
    text encoder lora_te1_; the trained alphas and kohya's lora_te_ are filled in here."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    converted = convert_state_dict_to_kohya({k: v for k, v in tensors.items() if ".lora_" in k})
    single_text_encoder = not any(key.startswith("text_encoder_2.") for key in tensors)
    names = {_kohya_name(module, single_text_encoder): module for module in _modules(tensors)}
    result = {}
    for key, tensor in converted.items():
        name, _, kind = key.partition(".")
        if single_text_encoder and name.startswith("lora_te1_"):
            name = "lora_te_" + name.removeprefix("lora_te1_")
        if kind == "alpha":
            tensor = torch.tensor(alphas[names[name]])
        result[f"{name}.{kind}"] = tensor.contiguous()
    return result


def _kohya_name(module: str, single_text_encoder: bool) -> str:
    prefix, _, path = module.partition(".")
    head = KOHYA_PREFIXES[prefix]
    if prefix == "text_encoder" and not single_text_encoder:
        head = "lora_te1"
    return f"{head}_{path.replace('.', '_')}"


def to_diffusers_alpha(tensors: dict, alphas: dict) -> dict:
    """diffusers-form LoRA tensors plus one ``<module>.alpha`` tensor per module (ComfyUI's strength)."""
    import torch

    result = {k: v.contiguous() for k, v in tensors.items() if not k.endswith(".alpha")}
    result.update({f"{module}.alpha": torch.tensor(alphas[module]) for module in _modules(tensors)})
    return result


def fuse_members(members, loras: dict, where: str):
    """One LoRA (down, up, alpha) on a fused layer from LoRAs on its members: members are (layer, part, parts, rows)
    in the fused layer's row order, loras layer -> (A, B, alpha) for the trained ones. down stacks the trained
    layers' A matrices, up puts each one's B rows at its members' rows and in its own columns (block-diagonal), so
    up @ down is exactly the members' products one above the other; alpha is alpha / rank x the fused rank, keeping
    the trained scale. An untrained member gets zero rows."""
    import torch

    present = [layer for layer in dict.fromkeys(member[0] for member in members) if layer in loras]
    ranks = {loras[layer][0].shape[0] for layer in present}
    scales = {loras[layer][2] / loras[layer][0].shape[0] for layer in present}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"{where}: its members have ranks {sorted(ranks)} and scales {sorted(scales)}; the "
                         "fused form makes them one LoRA, which needs one rank and one alpha / rank")
    down = torch.cat([loras[layer][0] for layer in present])
    columns, offset = {}, 0
    for layer in present:
        columns[layer] = slice(offset, offset + loras[layer][0].shape[0])
        offset += loras[layer][0].shape[0]
    up = torch.zeros(sum(member[3] for member in members), down.shape[0], dtype=down.dtype)
    row = 0
    for layer, part, _, rows in members:
        if layer in loras:
            up[row:row + rows, columns[layer]] = loras[layer][1][part * rows:(part + 1) * rows]
        row += rows
    return down.contiguous(), up.contiguous(), scales.pop() * down.shape[0]


def to_official_fused(tensors: dict, alphas: dict, fused_layers: dict, prefix: str = "transformer") -> dict:
    """diffusers-form LoRA tensors -> the original model's fused form under ``base_model.model.``; fused_layers maps
    a diffusers layer (in a block) to (original fused layer, position, members) (Family.lora_fused_layers).
    The members are fused by fuse_members (equal rows here)."""
    import torch

    groups = {}  # official module -> (count, {position: module})
    loras = {}
    for module, pair in _modules(tensors).items():
        path = module.removeprefix(prefix + ".")
        match = re.fullmatch(r"(blocks\.\d+)\.(.+)", path)
        if match and match.group(2) in fused_layers:
            fused, position, count = fused_layers[match.group(2)]
            target = f"{match.group(1)}.{fused}"
        else:  # a layer the official model names as diffusers does (lora.target_modules beyond attention)
            target, position, count = path, 0, 1
        groups.setdefault(target, (count, {}))[1][position] = module
        loras[module] = (pair["A"], pair["B"], alphas[module])
    result = {}
    for target, (count, positions) in groups.items():
        out_features = loras[next(iter(positions.values()))][1].shape[0]
        members = [(positions.get(p, f"{target}#{p}"), 0, 1, out_features) for p in range(count)]
        down, up, alpha = fuse_members(members, loras, target)
        result[f"{OFFICIAL_PREFIX}{target}.lora_A.weight"] = down
        result[f"{OFFICIAL_PREFIX}{target}.lora_B.weight"] = up
        result[f"{OFFICIAL_PREFIX}{target}.alpha"] = torch.tensor(float(alpha))
    return result


def to_kohya_fused(tensors: dict, alphas: dict, family) -> dict:
    """diffusers-form LoRA tensors (the denoiser's) -> kohya names of the original model's layers, fused as the
    family plans (Family.lora_original_layers; FLUX: double_blocks.N.img_attn.qkv, single_blocks.N.linear1, ...)."""
    import torch

    prefix = family.denoiser
    modules = _modules(tensors)
    other = next((module for module in modules if not module.startswith(prefix + ".")), None)
    if other is not None:
        raise ValueError(f"{other}: only {prefix} layers have kohya names in {family.name}'s original form")
    loras = {m.removeprefix(prefix + "."): (pair["A"], pair["B"], alphas[m]) for m, pair in modules.items()}
    result = {}
    for original, members in family.lora_original_layers({m: lora[1].shape[0] for m, lora in loras.items()}).items():
        down, up, alpha = fuse_members(members, loras, original)
        name = f"{KOHYA_PREFIXES['unet']}_{original.replace('.', '_')}"
        result[f"{name}.lora_down.weight"], result[f"{name}.lora_up.weight"] = down, up
        result[f"{name}.alpha"] = torch.tensor(float(alpha))
    return result


def to_form(form: str, tensors: dict, alphas: dict, family) -> dict:
    """diffusers-form tensors -> the named form (the family's fused layers for the official form)."""
    if form not in FORMS:
        raise ValueError(f"LoRA export form {form!r}: use one of {', '.join(FORMS)}")
    if form == OFFICIAL_FUSED:
        return to_official_fused(tensors, alphas, family.lora_fused_layers, family.denoiser)
    if form == KOHYA_FUSED:
        return to_kohya_fused(tensors, alphas, family)
    return {KOHYA: to_kohya, DIFFUSERS_ALPHA: to_diffusers_alpha}[form](tensors, alphas)


# --- the tools' forms -> diffusers form -------------------------------------------------------------


def detect_form(keys) -> str:
    """Which form a file's tensor names are in: kohya, an original model's fused form, or diffusers'."""
    keys = [key for key in keys if key != "__metadata__"]
    if keys and all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in keys):
        return KOHYA
    if keys and all(key.startswith(OFFICIAL_PREFIX) for key in keys):
        return OFFICIAL_FUSED
    return DIFFUSERS_ALPHA


def _module_path(kohya_path: str) -> str:
    """A kohya module path (underscores) -> the diffusers one (dots), keeping the compound words whole."""
    tokens, parts = kohya_path.split("_"), []
    index = 0
    while index < len(tokens):
        for end in range(len(tokens), index, -1):
            word = "_".join(tokens[index:end])
            if end - index == 1 or word in COMPOUND_NAMES:
                parts.append(word)
                index = end
                break
    return ".".join(parts)


def from_kohya(tensors: dict, family=None) -> tuple[dict, dict]:
    """kohya tensors -> (diffusers-form tensors, module -> alpha); a module without alpha gets alpha = rank. With a
    family whose kohya form is kohya_fused, lora_unet_ names are its original layers (Family.lora_original_members),
    split exactly into its diffusers layers (synth.lora_formats.split_fused)."""
    from synth.lora_formats import split_fused

    fused = family is not None and family.lora_export_form == KOHYA_FUSED
    heads = {"lora_te1": "text_encoder", **{v: k for k, v in KOHYA_PREFIXES.items()}}
    if fused:
        heads["lora_unet"] = family.denoiser
    result, alphas = {}, {}
    for key, tensor in tensors.items():
        name, _, kind = key.partition(".")
        if kind != "lora_down.weight":
            continue
        head = next((h for h in sorted(heads, key=len, reverse=True) if name.startswith(h + "_")), None)
        if head is None or f"{name}.lora_up.weight" not in tensors:
            raise ValueError(f"{key}: not a kohya LoRA name (lora_unet_/lora_te_/lora_te1_/lora_te2_ with "
                             "lora_down and lora_up)")
        up = tensors[f"{name}.lora_up.weight"]
        alpha = tensors.get(f"{name}.alpha")
        alpha = float(alpha) if alpha is not None else float(tensor.shape[0])
        members = family.lora_original_members(name[len(head) + 1:], up.shape[0]) if fused and head == "lora_unet" \
            else None
        if members is None:
            module = f"{heads[head]}.{_module_path(name[len(head) + 1:])}"
            result[f"{module}.lora_A.weight"], result[f"{module}.lora_B.weight"] = tensor, up
            alphas[module] = alpha
            continue
        for layer, (a, b, layer_alpha) in split_fused(tensor, up, alpha, members).items():
            module = f"{family.denoiser}.{layer}"
            result[f"{module}.lora_A.weight"], result[f"{module}.lora_B.weight"] = a, b
            alphas[module] = layer_alpha
    return result, alphas


def from_official_fused(tensors: dict, fused_layers: dict, prefix: str = "transformer") -> tuple[dict, dict]:
    """Tensors in an original model's fused form -> (diffusers-form tensors, module -> alpha), splitting the fused
    layers (fused_layers: Family.lora_fused_layers).

    A block-diagonal fused LoRA (as to_official_fused writes it) splits back into the members' own rank-r
    LoRAs exactly; any other fused LoRA splits into rank-R members sharing the down matrix (also exact)."""
    members_of = {}
    for member, (fused, position, count) in fused_layers.items():
        members_of.setdefault(fused, [None] * count)[position] = member
    result, alphas = {}, {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        target = key[len(OFFICIAL_PREFIX):-len(".lora_A.weight")]
        up = tensors[f"{OFFICIAL_PREFIX}{target}.lora_B.weight"]
        alpha_tensor = tensors.get(f"{OFFICIAL_PREFIX}{target}.alpha")
        alpha = float(alpha_tensor) if alpha_tensor is not None else float(down.shape[0])
        match = re.match(r"blocks\.(\d+)\.(.+)$", target)
        members = members_of.get(match.group(2)) if match else None
        if not members:
            result[f"{prefix}.{target}.lora_A.weight"], result[f"{prefix}.{target}.lora_B.weight"] = down, up
            alphas[f"{prefix}.{target}"] = alpha
            continue
        count, rank = len(members), down.shape[0]
        out_features = up.shape[0] // count
        rows = [up[p * out_features:(p + 1) * out_features] for p in range(count)]
        # Members to_official_fused left out have zero rows; the others sit on the diagonal, r columns each.
        used = [p for p in range(count) if rows[p].abs().sum() > 0]
        used = used if used and len(used) < count else list(range(count))
        step = rank // len(used) if rank % len(used) == 0 else 0
        diagonal = step and all(
            (rows[p][:, :i * step].abs().sum() + rows[p][:, (i + 1) * step:].abs().sum()) == 0
            for i, p in enumerate(used))
        for i, p in enumerate(used if diagonal else range(count)):
            module = f"{prefix}.blocks.{match.group(1)}.{members[p]}"
            if diagonal:
                result[f"{module}.lora_A.weight"] = down[i * step:(i + 1) * step].contiguous()
                result[f"{module}.lora_B.weight"] = rows[p][:, i * step:(i + 1) * step].contiguous()
                alphas[module] = alpha / len(used)
            else:
                result[f"{module}.lora_A.weight"], result[f"{module}.lora_B.weight"] = down, rows[p].contiguous()
                alphas[module] = alpha
    return result, alphas


def peft_config(tensors: dict, alphas: dict, prefix: str) -> dict:
    """The LoraConfig arguments of a diffusers-form LoRA for diffusers' lora_adapter_metadata (keys without the
    prefix): the most common rank and alpha, with rank_pattern / alpha_pattern for the modules that differ."""
    from collections import Counter

    modules = {m.removeprefix(prefix + "."): pair for m, pair in _modules(tensors).items() if m.startswith(prefix + ".")}
    ranks = {m: pair["A"].shape[0] for m, pair in modules.items()}
    module_alpha = {m: alphas[f"{prefix}.{m}"] for m in modules}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(module_alpha.values()).most_common(1)[0][0]
    return {
        "r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(modules),
        "rank_pattern": {m: int(r) for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: float(a) for m, a in module_alpha.items() if a != alpha},
    }


# --- kohya's training metadata --------------------------------------------------------------------


def kohya_metadata(cfg, family, rank: int, alpha: float, output_name: str) -> dict:
    """sd-scripts' ss_* training metadata (every value a string, as sd-scripts writes them; A1111's extra-networks
    panel shows them) and the SAI model spec keys (modelspec.*)."""
    import time

    size = cfg.data.get("size", "")
    width, _, height = str(size).partition("x")
    height = height or width
    lr = cfg.optim.optimizer.get("lr")
    return {
        "ss_base_model_version": family.ss_base_model_version,
        "ss_sd_model_name": str(cfg.model.path),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_resolution": f"({width}, {height})",
        "ss_max_train_steps": str(cfg.trainer.get("max_steps")),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": "0",
        "ss_network_train_unet_only": "True",
        "ss_seed": str(cfg.seed),
        "ss_batch_size_per_device": str(cfg.data.get("batch_size", 1)),
        "ss_output_name": output_name,
        "ss_training_comment": f"trained with synth (model={family.name}, rank {rank}, alpha {alpha})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }


def steps_metadata(steps: int) -> dict:
    """ss_steps: the optimiser steps actually run (sd-scripts writes it at save time)."""
    return {"ss_steps": str(int(steps))}


def dumps(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# --- writing ------------------------------------------------------------------------------------------


def write_safetensors(path, tensors: dict, metadata: dict, overwrite: bool = True):
    """Write tensors atomically (a temporary file in the same folder, then a rename); with overwrite=False an
    existing file is never replaced, even one that appears meanwhile (the rename is a hard link then)."""
    import os
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from synth.images import current_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, scratch, metadata=metadata)
        os.chmod(scratch, 0o666 & ~current_umask())  # mkstemp gives 0600; outputs follow the umask
        if overwrite:
            os.replace(scratch, path)
        else:
            try:
                os.link(scratch, path)  # fails if path exists: no race between the check and the write
            except FileExistsError:
                raise ValueError(f"{path}: already exists; pass --overwrite to replace it") from None
    finally:
        Path(scratch).unlink(missing_ok=True)
    return path


def sibling_path(path, form: str):
    """Where the tools' form of lora.safetensors goes: lora.kohya.safetensors or lora.comfyui.safetensors beside it."""
    from pathlib import Path

    path = Path(path)
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.{FILE_TAGS[form]}.safetensors")
