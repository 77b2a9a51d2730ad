"""LoRA files: the format synth writes, the checks that run before any model loads, and loading into a pipeline.

A synth LoRA is one .safetensors file in diffusers' format: keys ``<prefix>.<module>.lora_A.weight`` /
``lora_B.weight`` with prefix ``unet`` or ``transformer``, diffusers' ``lora_adapter_metadata`` (the peft
LoraConfig, so alpha != rank loads at the right scale), and synth's own ``synth_lora`` metadata (family, base
model, rank, alpha, the resolved training config). Loading uses diffusers' ``load_lora_weights`` where diffusers
has a loader that reads the file, and peft directly for Hunyuan-DiT (diffusers has no Hunyuan-DiT LoRA loader);
files made elsewhere that neither reads (kohya, LyCORIS LoHa/LoKr, DoRA, text-encoder layers, SD3's and
Hunyuan-DiT's own names) are merged by their format's formula (synth.lora_formats). check_lora_fits decides which,
from the file's header.

The checks here read only the safetensors header, so importing this module does not import torch.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from pathlib import Path

log = logging.getLogger(__name__)

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
SYNTH_METADATA_KEY = "synth_lora"
# Families whose pipelines have no diffusers LoRA loader: synth injects the adapters with peft itself.


def denoiser_prefix(family) -> str:
    """The state-dict prefix diffusers uses for the denoiser: "unet" for UNet families, "transformer" for DiTs
    (the pipeline attribute the family names, Family.denoiser)."""
    return family.denoiser


# --- the checks before any model loads -------------------------------------------------------------


def lora_entries(lora_cfg) -> list[tuple[str, float]]:
    """The (path, scale) pairs a lora config asks for: lora.path/lora.scale, each a value or a list."""
    if lora_cfg is None or lora_cfg.get("path") in (None, "", []):
        return []
    paths, scales = lora_cfg.get("path"), lora_cfg.get("scale", 1.0)
    paths = [paths] if isinstance(paths, str) else list(paths)
    if isinstance(scales, (int, float)) and not isinstance(scales, bool):
        scales = [scales] * len(paths)
    elif isinstance(scales, str) or scales is None:
        raise ValueError(f"lora.scale={scales}: give a number (0.8) or a list with one number per lora.path")
    else:
        scales = list(scales)
    if len(scales) != len(paths):
        raise ValueError(
            f"lora.scale has {len(scales)} values for {len(paths)} lora.path entries; give one scale per LoRA "
            "(lora.path=[a.safetensors,b.safetensors] lora.scale=[0.8,0.5]) or a single number for all"
        )
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"lora.scale={scale!r}: must be a number (1.0 = as trained, 0 = off)")  # noqa: TRY004 (user input: entry points report ValueErrors)
        if not math.isfinite(scale):
            raise ValueError(f"lora.scale={scale}: must be a finite number (1.0 = as trained, 0 = off)")
    return [(str(path), float(scale)) for path, scale in zip(paths, scales)]


def read_header(path: str) -> dict:
    """The JSON header of a .safetensors file (tensor names, shapes and __metadata__), read without torch."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            raw = file.read(length)
            if len(raw) != length:
                raise ValueError(f"the file ends inside its {length}-byte header")
            header = json.loads(raw)
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"lora.path={path}: not a readable .safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"lora.path={path}: not a readable .safetensors file (its header is a JSON "
                         f"{type(header).__name__}, not an object)")
    return header


# safetensors dtype -> (bytes per value, numpy dtype); BF16 is widened to float32 by hand (numpy has no bfloat16)
FLOAT_DTYPES = {"F16": (2, "<f2"), "BF16": (2, "<u2"), "F32": (4, "<f4"), "F64": (8, "<f8")}


def check_lora_file(path: str) -> dict:
    """Refuse a malformed LoRA file before any model loads, naming the tensor: entries that are not tensors,
    non-float dtypes, data past the end of the file (truncated), nan/inf values, lora_A/lora_B pairs whose ranks
    differ. safetensors itself checks the layout but not dtypes or values, and diffusers would fail mid-load or
    sample a black image; numpy reads the values, so torch is not needed here. Returns the header."""
    import numpy as np

    header = read_header(path)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"lora.path={path}: its __metadata__ must map names to strings")
    size = Path(path).stat().st_size
    shapes = {}
    with open(path, "rb") as file:
        start_of_data = 8 + struct.unpack("<Q", file.read(8))[0]  # offsets count from the end of the header
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            where = f"lora.path={path}: tensor {name!r}"
            if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
                raise ValueError(f"{where} is not a tensor entry (dtype, shape, data_offsets)")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"{where} has dtype {dtype}; LoRA weights must be floating point "
                                 f"({', '.join(FLOAT_DTYPES)})")
            valid_ints = lambda values: isinstance(values, list) and all(  # noqa: E731
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
            if not valid_ints(shape) or not valid_ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
                raise ValueError(f"{where} has a malformed shape {shape!r} or data_offsets {offsets!r}")
            width, numpy_dtype = FLOAT_DTYPES[dtype]
            if (offsets[1] - offsets[0]) != math.prod(shape) * width:
                raise ValueError(f"{where}: {offsets[1] - offsets[0]} bytes of data do not hold {dtype} values of "
                                 f"shape {shape}")
            if start_of_data + offsets[1] > size:
                raise ValueError(f"lora.path={path}: the file is truncated (tensor {name!r} needs bytes up to "
                                 f"{start_of_data + offsets[1]}, the file has {size})")
            file.seek(start_of_data + offsets[0])
            values = np.frombuffer(file.read(offsets[1] - offsets[0]), dtype=numpy_dtype)
            if dtype == "BF16":
                values = (values.astype(np.uint32) << 16).view("<f4")
            # F64 values beyond float32's range become inf in the model's dtype
            if not np.isfinite(values).all() or (dtype == "F64" and (np.abs(values) > np.finfo(np.float32).max).any()):
                raise ValueError(f"{where} holds nan or inf values; the LoRA is broken (an overflowed training?)")
            shapes[name] = shape
    for name, shape in shapes.items():
        if ".lora_A." not in name:
            continue
        partner = name.replace(".lora_A.", ".lora_B.")
        if partner not in shapes:
            raise ValueError(f"lora.path={path}: tensor {name!r} has no matching {partner!r}")
        rank_a = shape[0] if shape else None
        rank_b = shapes[partner][1] if len(shapes[partner]) > 1 else None
        if rank_a is None or rank_a != rank_b:
            raise ValueError(
                f"lora.path={path}: tensor {name!r} has rank {rank_a} but {partner!r} has rank {rank_b} "
                f"(shapes {shape} and {shapes[partner]}); lora_A is (rank, in) and lora_B (out, rank)"
            )
    for name in shapes:
        if ".lora_B." in name and name.replace(".lora_B.", ".lora_A.") not in shapes:
            raise ValueError(f"lora.path={path}: tensor {name!r} has no matching lora_A tensor")
    return header


def read_metadata(path: str) -> dict:
    """synth's metadata of a LoRA file ({} for LoRAs made elsewhere)."""
    metadata = read_header(path).get("__metadata__") or {}
    try:
        stored = json.loads(metadata[SYNTH_METADATA_KEY]) if SYNTH_METADATA_KEY in metadata else {}
    except (json.JSONDecodeError, TypeError):
        raise ValueError(f"lora.path={path}: its {SYNTH_METADATA_KEY} metadata is not valid JSON") from None
    if not isinstance(stored, dict):
        raise ValueError(f"lora.path={path}: its {SYNTH_METADATA_KEY} metadata is not a JSON object")
    return stored


def check_lora_inputs(lora_cfg, family_name: str) -> None:
    """Every lora.path must be an existing .safetensors file, made for this family if it says which."""
    for path, _ in lora_entries(lora_cfg):
        if not path.lower().endswith(".safetensors"):
            raise ValueError(
                f"lora.path={path}: only .safetensors LoRA files are loaded (.ckpt/.pt/.bin files can run "
                "arbitrary code when unpickled)"
            )
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"lora.path={path}: no such file")
        check_lora_file(str(Path(path).expanduser()))  # layout, dtypes, values and ranks, before any model loads
        made_for = read_metadata(str(Path(path).expanduser())).get("family")
        if made_for is not None and made_for != family_name:
            raise ValueError(
                f"lora.path={path}: this LoRA was trained for {made_for}, not {family_name}; "
                f"use it with model={made_for} (or a {made_for} checkpoint)"
            )


def lora_key(lora_cfg) -> str:
    """What identifies the LoRAs a pipeline carries: paths, file sizes and times, and scales."""
    parts = []
    for path, scale in lora_entries(lora_cfg):
        stat = Path(path).expanduser().stat()
        parts.append(f"{Path(path).expanduser().resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{scale}")
    return ";".join(parts)


# --- writing ---------------------------------------------------------------------------------------


def save_lora(path, state_dict: dict, prefix: str, adapter_config: dict, synth_metadata: dict) -> Path:
    """Write a LoRA state dict (peft names, no prefix) as a diffusers-format .safetensors file, atomically."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{prefix}.{key}": tensor.detach().to("cpu").contiguous() for key, tensor in state_dict.items()}
    metadata = {
        "format": "pt",
        # diffusers reads this back into a LoraConfig (rank, alpha, target modules) when loading.
        DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in adapter_config.items()}, sort_keys=True),
        SYNTH_METADATA_KEY: json.dumps(synth_metadata, sort_keys=True, default=str),
    }
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, scratch, metadata=metadata)
        from synth.images import current_umask

        os.chmod(scratch, 0o666 & ~current_umask())  # mkstemp gives 0600; outputs follow the umask
        os.replace(scratch, path)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return path


# --- loading ---------------------------------------------------------------------------------------


# diffusers' older UNet LoRA format (unet.<...>.processor.to_q_lora.down.weight); its text-encoder half is not
# taken (diffusers 0.42 drops text-encoder LoRAs under transformers 5, and synth has no merge for these names)
OLD_DIFFUSERS_KEY = re.compile(r"^unet\..*(_lora|\.lora_linear_layer|\.lora)\.(down|up)\.weight$")


def guess_family(keys, family) -> tuple[str, list[str]] | None:
    """The other family whose typical LoRA key fragments (Family.lora_markers) the keys hold most of, and those
    fragments; None when no family's are there."""
    from synth.families import FAMILIES

    found = {other.name: [marker for marker in other.lora_markers if any(marker in key for key in keys)]
             for other in FAMILIES.values()}
    best = max((name for name in found if name != family.name), key=lambda name: len(found[name]))
    if not found[best] or len(found[best]) <= len(found[family.name]):
        return None
    return best, found[best]


def check_lora_fits(path: str, pipe, family) -> dict:
    """Refuse a LoRA whose keys or shapes do not fit the pipeline, from the file's header alone, and plan how it
    loads: {"route": "diffusers" | "peft" | "merge", "modules": [(parameters, targets, stored alpha), ...]}. Keys pick nothing
    but names in tables of the model's own layers (synth.lora_formats)."""
    from synth.lora_formats import KOHYA_UNET_PREFIX, delta_shape, group_keys, kind_of, resolve

    # 1. Every key is a parameter of a format synth reads
    header = read_header(path)
    shapes = {key: entry["shape"] for key, entry in header.items() if key != "__metadata__"}
    groups, unknown = group_keys(shapes)
    if unknown and not family.peft_loaded and all(OLD_DIFFUSERS_KEY.search(key) for key in shapes):
        return {"route": "diffusers", "modules": []}  # diffusers' own attention-processor format: its loader reads it
    if unknown or not groups:
        example = unknown[0] if unknown else "(no tensors)"
        raise ValueError(
            f"lora.path={path}: {len(unknown)} keys are in no LoRA format synth reads (e.g. {example!r}); it reads "
            "diffusers/peft (lora_A/lora_B), kohya (lora_down/lora_up/alpha, dora_scale), LyCORIS LoHa (hada_*) "
            "and LoKr (lokr_*) files"
        )
    for module_key, params in groups.items():
        if kind_of(params) is None:
            raise ValueError(f"lora.path={path}: layer {module_key!r} has only {', '.join(sorted(params))}; "
                             "the file is incomplete or in a format synth does not read")
    # 2. Every module names layers of this pipeline
    indexes, modules, unresolved = {}, [], []
    for module_key, params in groups.items():
        targets = resolve(module_key, family, pipe, indexes)
        if targets is None:
            unresolved.append(module_key)
        else:
            modules.append((module_key, params, targets))
    if unresolved:
        guess = guess_family(list(groups), family)
        if guess is not None:
            raise ValueError(f"lora.path={path}: looks made for {guess[0]} (keys {'/'.join(f'{m}*' for m in guess[1])}"
                             f"), not {family.name}; use it with model={guess[0]}")
        prefixes = ", ".join(sorted({prefix for prefix, component in family.lora_prefixes if hasattr(pipe, component)}))
        what = "none of its layers is" if not modules else f"{len(unresolved)} of its {len(groups)} layers are not"
        raise ValueError(
            f"lora.path={path}: {what} a layer of this {family.name} model (e.g. {unresolved[0]!r}; {family.name} "
            f"has no layer of that name, its LoRA keys start with {prefixes}); the LoRA is for another model"
        )
    # 3. Every delta has the layer's shape (a fused layer: its targets' rows stacked)
    for module_key, params, targets in modules:
        if kind_of(params) == "lora":
            down = shapes[params.get("lora_down.weight") or params["lora_A.weight"]]
            up = shapes[params.get("lora_up.weight") or params["lora_B.weight"]]
            if len(down) < 2 or len(up) < 2 or down[0] != up[1]:
                raise ValueError(f"lora.path={path}: layer {module_key!r} has down/A shape {down} and up/B shape "
                                 f"{up}, whose ranks differ; down is (rank, in) and up (out, rank)")
        rows, columns = delta_shape(params, shapes)
        layer_shapes = [indexes[component][0][layer] for component, layer, _, _ in targets]
        want_rows, want_columns = sum(s[0] for s in layer_shapes), math.prod(layer_shapes[0][1:])
        if (rows, columns) != (want_rows, want_columns) or len({s[0] for s in layer_shapes}) != 1:
            layer = targets[0][1] if len(targets) == 1 else "+".join(t[1] for t in targets)
            raise ValueError(
                f"lora.path={path}: layer {module_key!r} makes a {rows} x {columns} change, which does not fit this "
                f"{family.name} model's {layer!r} ({want_rows} x {want_columns}); the LoRA is for another model "
                "size or family"
            )
    # 4. The route: diffusers' (or peft's) loader where it reads the file as it is, else synth's merge
    params_used = set().union(*(set(params) for params in groups.values()))
    dotted = all(key.split(".")[0] == targets[0][0] for key, _, targets in modules)
    only_denoiser = {targets[0][0] for _, _, targets in modules} == {family.denoiser}
    # Denoiser layers only: diffusers 0.42 injects no text-encoder LoRA into transformers 5's CLIP (it warns and
    # drops them, in diffusers' and kohya's names alike), so files with text-encoder layers are merged by synth.
    if params_used <= {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"} and dotted and only_denoiser:
        if family.peft_loaded:
            route = "peft" if "lora_magnitude_vector" not in params_used else "merge"
        else:
            route = "diffusers"
    elif (family.kohya_in_diffusers and params_used <= {"lora_down.weight", "lora_up.weight", "alpha"}
          and all(key.startswith(KOHYA_UNET_PREFIX) for key in groups)):
        route = "diffusers"
    else:
        route = "merge"
    stored = stored_alphas(header)
    return {"route": route, "modules": [(params, targets, stored_alpha(stored, key)) for key, params, targets in modules]}


def stored_alphas(header) -> dict:
    """component -> the peft LoraConfig fields a diffusers-format file stores in its metadata ({} if none)."""
    raw = (header.get("__metadata__") or {}).get(DIFFUSERS_METADATA_KEY)
    try:
        stored = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    configs = {}
    for key, value in (stored.items() if isinstance(stored, dict) else ()):
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def stored_alpha(configs: dict, module_key: str) -> float | None:
    """The lora_alpha the stored peft config gives a module (its alpha_pattern entry, else lora_alpha), as peft
    applies it when diffusers loads the file; None for files without one."""
    component, _, module = module_key.partition(".")
    config = configs.get(component)
    if not config:
        return None
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if isinstance(pattern, str) and (module == pattern or module.endswith("." + pattern)):
            return alpha if isinstance(alpha, (int, float)) else None
    alpha = config.get("lora_alpha")
    return alpha if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None


def _peft_config(path: str, prefix: str, state_dict: dict):
    """The LoraConfig stored in the file, or one inferred from the shapes (rank = alpha) for files without it."""
    from peft import LoraConfig

    raw = (read_header(path).get("__metadata__") or {}).get(DIFFUSERS_METADATA_KEY)
    if raw:
        stored = json.loads(raw)
        kwargs = {k[len(prefix) + 1 :]: v for k, v in stored.items() if k.startswith(prefix + ".")}
        kwargs = {k: v for k, v in kwargs.items() if k in LoraConfig.__dataclass_fields__}
        return LoraConfig(**kwargs)
    modules = sorted({key.rpartition(".lora_")[0] for key in state_dict if ".lora_" in key})
    rank = next(tensor.shape[0] for key, tensor in state_dict.items() if ".lora_A." in key)
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=modules)


def load_peft_lora(model, path: str, prefix: str, adapter_name: str) -> None:
    """Inject one LoRA into a model that has no diffusers LoRA loader (Hunyuan-DiT), with peft alone."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    tensors = load_file(path)
    state_dict = {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
    inject_adapter_in_model(_peft_config(path, prefix, state_dict), model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"lora.path={path}: {len(unexpected)} weights did not load, e.g. {unexpected[0]}")


def merge_lora(pipe, path: str, scale: float, modules) -> None:
    """Merge one LoRA file into the pipeline's weights at scale, each layer's delta by its format's formula
    (synth.lora_formats), for the files no diffusers or peft loader reads."""
    import torch
    from safetensors.torch import load_file

    from synth.lora_formats import compute_delta, merged_weight

    tensors = load_file(path)
    with torch.no_grad():
        for params, targets, default_alpha in modules:
            layers = []
            for component, name, _, _ in targets:
                layer = getattr(pipe, component).get_submodule(name)
                layers.append(getattr(layer, "base_layer", layer))  # under a peft adapter: the weights it wraps
            first = layers[0].weight
            delta = compute_delta(tensors, params, (first.shape[0] * len(layers), *first.shape[1:]), default_alpha)
            magnitude_key = params.get("dora_scale") or params.get("lora_magnitude_vector")
            magnitude = tensors[magnitude_key] if magnitude_key else None
            for (_, _, chunk, chunks), layer, part in zip(targets, layers, delta.chunk(len(layers))):
                dora = magnitude
                if magnitude is not None and chunks > 1:
                    dora = magnitude.chunk(chunks)[chunk] if magnitude.shape[0] == delta.shape[0] else magnitude
                weight = layer.weight
                new = merged_weight(weight, part.to(weight.device), None if dora is None else dora.to(weight.device),
                                    scale)
                weight.copy_(new.to(weight.dtype))


def load_loras(pipe, family, lora_cfg, hotswap: bool = False) -> None:
    """Load every LoRA lora_cfg names into the text-to-image pipeline and activate them at their scales: diffusers'
    and peft's loaders for the files they read, synth's merge for the rest (check_lora_fits plans which).

    hotswap (accel.lora_hotswap, after pipe.enable_lora_hotswap): only files diffusers' loader reads, each swapped
    into the adapter of its position (lora0, lora1, ...) in place when that adapter is already loaded."""
    entries = lora_entries(lora_cfg)
    if not entries:
        return
    model = getattr(pipe, denoiser_prefix(family))
    plans = [check_lora_fits(str(Path(path).expanduser()), pipe, family) for path, _ in entries]  # all, first
    for (path, _), plan in zip(entries, plans):
        if hotswap and plan["route"] != "diffusers":
            # A merge changes the weights themselves and peft's own route has no hotswap: refused rather than
            # rebuilt, so that a hotswap sweep never reloads and recompiles behind the user's back.
            raise ValueError(f"accel.lora_hotswap=true: lora.path={path} is not read by diffusers' LoRA loader (synth "
                             f"{'merges' if plan['route'] == 'merge' else 'loads'} it by {plan['route']}), so it cannot "
                             "be swapped in place; use accel.lora_hotswap=false")
    loaded = getattr(model, "peft_config", None) or {}
    swapping = hotswap and all(f"lora{index}" in loaded for index in range(len(entries)))
    names, scales = [], []
    for index, ((path, scale), plan) in enumerate(zip(entries, plans)):
        path = str(Path(path).expanduser())
        name = f"lora{index}"
        log.info("loading LoRA %s at scale %s (%s)", path, scale, plan["route"])
        if plan["route"] == "merge":
            merge_lora(pipe, path, scale, plan["modules"])
            continue
        if plan["route"] == "peft":
            load_peft_lora(model, path, denoiser_prefix(family), name)
        else:
            # Through the text-to-image pipeline: KolorsImg2ImgPipeline.load_lora_weights fails in diffusers 0.42
            # (it looks for text_encoder_2); image-to-image shares these layers through from_pipe.
            pipe.load_lora_weights(path, adapter_name=name, **({"hotswap": True} if swapping else {}))
        names.append(name)
        scales.append(scale)
    if not names:
        return
    if hotswap:
        if not swapping:
            pipe.set_adapters(names)  # all active, at weight 1: each layer's scaling is its file's alpha / rank
        scale_in_place(model, names, scales)
        return
    if family.peft_loaded:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(model, names, scales)
    else:
        pipe.set_adapters(names, adapter_weights=scales)


def scale_in_place(model, names: list[str], scales: list[float]) -> None:
    """accel.lora_hotswap: each adapter's layers scaled by its lora.scale, their scalings kept as tensors.

    The gap in peft 0.21 / diffusers 0.42: a hotswap sets every swapped layer's scaling to the new file's
    alpha / rank but leaves the layer's lora_alpha and r as the first file's, and set_adapters (peft's set_scale)
    recomputes the scaling from those, as a Python float, which a compiled graph holds as a constant: the new
    file's alpha would be lost, and a changed scale would recompile. A tensor scaling is an input of the graph."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, scale in zip(names, scales):
            value = module.scaling.get(name)
            if isinstance(value, torch.Tensor):
                value.mul_(scale)
            elif value is not None:
                module.scaling[name] = torch.tensor(value * scale, device=module.weight.device)
