"""LoRA files made elsewhere: which layout a file is in, which model layer each of its keys patches, and the
weight change each format defines.

Layouts recognised (key = <module><separator><parameter>):
- diffusers/peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (synth's own; prefix = pipeline component)
- kohya / A1111: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``
  (``lora_te_``, ``lora_te1_``, ``lora_te2_``, ... for text encoders; LoCon: the same on conv layers, 3x3 included,
  with an optional ``lora_mid.weight``; DoRA: ``dora_scale``)
- LyCORIS LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``/``hada_t2``), ``alpha``
- LyCORIS LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``
  (+ ``lokr_t2``), ``alpha``
Which file prefixes exist, which component each patches and how a family's original module names (SGM UNet
blocks, SD3's MMDiT, Hunyuan-DiT's own) map to diffusers' modules, the family says (Family.lora_prefixes,
Family.lora_module_targets).

diffusers' load_lora_weights loads diffusers files, and converts plain kohya LoRA files for SD1.5/SDXL; everything
else (LoHa, LoKr, DoRA, kohya files for SD3/Kolors/Hunyuan-DiT, the official Hunyuan-DiT form, per-module alpha
in diffusers names) has no loader in diffusers 0.42 or peft that takes these files, so synth fills the gap here:
it computes each layer's delta by the format's formula and merges it into the weights at lora.scale (as A1111 and
ComfyUI apply them). For a family with Family.lora_renamed_for_diffusers (FLUX), plain LoRAs in other names are
instead renamed into diffusers' layers here (split_fused) and handed to diffusers' loader, so they stay adapters. The pipeline cache keys on the LoRA files and scales (synth.loras.lora_key), and a pipeline
is loaded fresh from disk for every new key, so merged weights are never reused without their LoRAs.

Planning reads only the safetensors header (names and shapes): file keys pick no class, path or setting; they
are looked up in tables of the model's own module names.
"""

from __future__ import annotations

import math
import re

# Parameter names of each format, longest first so that "lokr_w1_a" is not read as "lokr_w1".
LORA_PARAMS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight")
LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARAMS = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2")
EXTRA_PARAMS = ("alpha", "dora_scale", "lora_magnitude_vector")  # DoRA magnitudes: kohya/LyCORIS, peft
PARAMS = LORA_PARAMS + LOHA_PARAMS + LOKR_PARAMS + EXTRA_PARAMS
KOHYA_UNET_PREFIX = "lora_unet_"  # kohya files diffusers' converter loads whole: UNet layers only (see synth.loras)


def split_key(key: str) -> tuple[str, str] | None:
    """(module key, parameter name) of a tensor key, or None for a key no format defines."""
    for param in PARAMS:
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    return None


def group_keys(keys) -> tuple[dict, list]:
    """module key -> {parameter: tensor key}, and the keys no format defines."""
    groups, unknown = {}, []
    for key in keys:
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
        else:
            groups.setdefault(parts[0], {})[parts[1]] = key
    return groups, unknown


def kind_of(params) -> str | None:
    """Which format a module's parameters are in: lora, loha or lokr (None: incomplete)."""
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(params):
        return "loha"
    if ({"lokr_w1"} <= set(params) or {"lokr_w1_a", "lokr_w1_b"} <= set(params)) and (
            {"lokr_w2"} <= set(params) or {"lokr_w2_a", "lokr_w2_b"} <= set(params)):
        return "lokr"
    if {"lora_down.weight", "lora_up.weight"} <= set(params) or {"lora_A.weight", "lora_B.weight"} <= set(params):
        return "lora"
    return None


def layer_index(component) -> tuple[dict, dict]:
    """The patchable layers of a pipeline component: dotted name -> weight shape, and kohya's name (dots as
    underscores) -> dotted name. A layer already carrying a peft adapter counts under its own name."""
    import torch

    shapes = {}
    for name, module in component.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            shapes[name.removesuffix(".base_layer")] = tuple(module.weight.shape)
    return shapes, {name.replace(".", "_"): name for name in shapes}


def match_prefix(module_key: str, family) -> tuple[str, str, str] | None:
    """(file prefix, pipeline component, the rest of the key) for the family's longest matching prefix."""
    for prefix, component in sorted(family.lora_prefixes, key=lambda entry: -len(entry[0])):
        if module_key.startswith(prefix):
            return prefix, component, module_key[len(prefix):]
    return None


def resolve(module_key: str, family, pipe, indexes: dict):
    """The (component, layer, part, parts) targets a file's module key patches, or None: the family rewrites its
    original names (a fused qkv patches 3 layers, its rows theirs stacked; see Family.lora_module_targets); kohya
    names are looked up with underscores, diffusers names as they are."""
    matched = match_prefix(module_key, family)
    if matched is None:
        return None
    prefix, component, rest = matched
    model = getattr(pipe, component, None)
    if model is None:
        return None
    if component not in indexes:
        indexes[component] = layer_index(model)
    shapes, by_underscores = indexes[component]
    underscored = prefix.endswith("_")
    targets = []
    for name, part, parts in family.lora_module_targets(component, rest, underscored, model):
        # transformers 5 flattened CLIPTextModel (encoder...) but not CLIPTextModelWithProjection
        # (text_model.encoder...): files name either, so both spellings are tried
        separator = "_" if underscored else "."
        spellings = [name, name.removeprefix(f"text_model{separator}"), f"text_model{separator}{name}"]
        layer = next((by_underscores[n] if underscored else n for n in spellings
                      if n in (by_underscores if underscored else shapes)), None)
        if layer is None:
            return None
        targets.append((component, layer, part, parts))
    return targets or None


# --- shapes from the header: what a module's delta will be, so a file is checked before any tensor loads ---


def delta_shape(params: dict, shapes: dict) -> tuple[int, int]:
    """(rows, columns per row) of the delta the parameters make: rows = output features, columns = the rest."""
    kind = kind_of(params)
    if kind == "lora":
        down = shapes[params.get("lora_down.weight") or params["lora_A.weight"]]
        up = shapes[params.get("lora_up.weight") or params["lora_B.weight"]]
        columns = math.prod(down[1:])
        if "lora_mid.weight" in params:
            columns = down[1] * math.prod(shapes[params["lora_mid.weight"]][2:])
        return up[0], columns
    if kind == "loha":
        w1a, w1b = shapes[params["hada_w1_a"]], shapes[params["hada_w1_b"]]
        if "hada_t1" in params:  # tucker: w1_a (rank, out), w1_b (rank, in), t1 (rank, rank, kh, kw)
            return w1a[1], w1b[1] * math.prod(shapes[params["hada_t1"]][2:])
        return w1a[0], w1b[1]
    w1 = (shapes[params["lokr_w1"]] if "lokr_w1" in params
          else (shapes[params["lokr_w1_a"]][0], shapes[params["lokr_w1_b"]][1]))
    if "lokr_w2" in params:
        w2 = shapes[params["lokr_w2"]]
        w2 = (w2[0], math.prod(w2[1:]))
    elif "lokr_t2" in params:
        w2 = (shapes[params["lokr_w2_a"]][1], shapes[params["lokr_w2_b"]][1] * math.prod(shapes[params["lokr_t2"]][2:]))
    else:
        w2 = (shapes[params["lokr_w2_a"]][0], shapes[params["lokr_w2_b"]][1])
    return w1[0] * w2[0], math.prod(w1[1:]) * w2[1]


# --- the formulas ---------------------------------------------------------------------------------


def _tucker(core, w_b, w_a):
    """A LyCORIS Tucker (CP) factor: core (rank, rank, kh, kw) with w_b (rank, in) and w_a (rank, out) ->
    (out, in, kh, kw)."""
    import torch

    return torch.einsum("ijhw,jr,ip->prhw", core, w_b, w_a)


def _scale(tensors, params, rank, default_alpha=None) -> float:
    """alpha / rank, or 1 when the file stores no alpha (kohya's and LyCORIS's rule); default_alpha stands in for
    a missing per-module alpha (the peft config a diffusers file stores in its metadata)."""
    if "alpha" in params:
        alpha = float(tensors[params["alpha"]].float().reshape(-1)[0])
    elif default_alpha is not None:
        alpha = float(default_alpha)
    else:
        return 1.0
    return alpha / rank if rank else 1.0


def compute_delta(tensors: dict, params: dict, weight_shape, default_alpha=None):
    """The weight change of one module, in float32 and the layer weight's shape, by its format's definition:
    LoRA up @ down * alpha/rank (rank = lora_down's rows); LoHa (w1a @ w1b) * (w2a @ w2b) * alpha/rank;
    LoKr kron(w1, w2) * alpha/rank when w1 or w2 is factored (rank = its inner size), else kron(w1, w2)."""
    get = lambda name: tensors[params[name]].float()  # noqa: E731
    kind = kind_of(params)
    if kind == "lora":
        down = get("lora_down.weight") if "lora_down.weight" in params else get("lora_A.weight")
        up = get("lora_up.weight") if "lora_up.weight" in params else get("lora_B.weight")
        rank = down.shape[0]
        if "lora_mid.weight" in params:  # LoCon's Tucker form: down 1x1, mid k x k, up 1x1
            delta = _tucker(get("lora_mid.weight"), down.flatten(1), up.flatten(1).T)
        else:
            delta = up.flatten(1) @ down.flatten(1)
        return delta.reshape(weight_shape) * _scale(tensors, params, rank, default_alpha)
    if kind == "loha":
        rank = get("hada_w1_b").shape[0]
        if "hada_t1" in params:
            w1 = _tucker(get("hada_t1"), get("hada_w1_b"), get("hada_w1_a"))
            w2 = _tucker(get("hada_t2"), get("hada_w2_b"), get("hada_w2_a"))
        else:
            w1, w2 = get("hada_w1_a") @ get("hada_w1_b"), get("hada_w2_a") @ get("hada_w2_b")
        return (w1 * w2).reshape(weight_shape) * _scale(tensors, params, rank, default_alpha)
    import torch

    rank = None
    if "lokr_w1" in params:
        w1 = get("lokr_w1")
    else:
        w1, rank = get("lokr_w1_a") @ get("lokr_w1_b"), get("lokr_w1_b").shape[0]
    if "lokr_w2" in params:
        w2 = get("lokr_w2")
    elif "lokr_t2" in params:
        w2, rank = _tucker(get("lokr_t2"), get("lokr_w2_b"), get("lokr_w2_a")), rank or get("lokr_w2_b").shape[0]
    else:
        w2, rank = get("lokr_w2_a") @ get("lokr_w2_b"), rank or get("lokr_w2_b").shape[0]
    if len(weight_shape) == 4:  # a conv: w2 carries the kernel, w1 only mixes channel blocks
        w2 = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
        w1 = w1.reshape(*w1.shape[:2], 1, 1)
    return torch.kron(w1, w2).reshape(weight_shape) * _scale(tensors, params, rank, default_alpha)


def merged_weight(weight, delta, dora_scale, scale: float):
    """The layer's new weight: W + scale * delta, or for DoRA the weight renormalised to the file's magnitudes,
    (m * (W + delta) / ||W + delta||), reached by scale as a blend from W. The norm runs over the axis whose size
    dora_scale has: per output row (peft, LyCORIS wd_on_out) or per input column (kohya/LyCORIS default)."""
    base = weight.float()
    if dora_scale is None:
        return base + scale * delta
    patched = base + delta
    magnitude = dora_scale.float()
    if magnitude.shape[0] == patched.shape[0] and magnitude.numel() == patched.shape[0]:  # ComfyUI's rule
        norm = patched.reshape(patched.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (patched.dim() - 1))
    else:
        norm = patched.transpose(0, 1).reshape(patched.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (patched.dim() - 2))
    magnitude = magnitude.reshape(norm.shape)
    return base + scale * (patched * (magnitude / norm) - base)


def split_fused(down, up, alpha: float, members) -> dict:
    """A LoRA on a fused layer (down (rank, in), up (rows, rank), alpha) as exact LoRAs on its members: members are
    (layer, part, parts, rows) in the fused layer's row order (Family.lora_module_targets). Returns layer ->
    (A, B, alpha) with each layer's product its rows of up @ down and alpha / rank kept; each takes only the columns
    of up its rows use, so a block-diagonal fused LoRA (kohya's qkv) splits back into its members' own ranks, and
    any other shares down."""
    import torch

    rank, start, layers = down.shape[0], 0, {}
    for layer, part, parts, rows in members:
        layers.setdefault(layer, [None] * parts)[part] = up[start:start + rows]
        start += rows
    out = {}
    for layer, pieces in layers.items():
        filled = next(piece for piece in pieces if piece is not None)
        b = torch.cat([filled.new_zeros(filled.shape) if piece is None else piece for piece in pieces])
        used = b.ne(0).any(dim=0)
        if not used.any():  # an untrained (zero) member: kept whole, it adds nothing
            used = torch.ones_like(used)
        out[layer] = (down[used].contiguous(), b[:, used].contiguous(), alpha * int(used.sum()) / rank)
    return out


# --- name rewrites a family uses (its tables live in its module) ------------------------------------


def rename_parts(name: str, table) -> str:
    """name with each (regex, replacement) of table applied in turn."""
    for pattern, replacement in table:
        name = re.sub(pattern, replacement, name)
    return name
