"""`python -m synth.lora convert IN OUT --to kohya|comfyui|diffusers [--family F] [--overwrite]`: a LoRA file
from one form to another (synth.lora_export holds the forms).

kohya: lora_unet_/lora_te_ names with per-module alpha (A1111/Forge, ComfyUI, diffusers; the UNet families, and
FLUX in BFL's original names, as kohya sd-scripts writes them).
comfyui: the form ComfyUI reads for the file's family (kohya for UNets and FLUX, diffusers keys + alpha for SD3, the
official base_model.model. form for Hunyuan-DiT). diffusers: diffusers/peft keys with diffusers' LoraConfig
metadata (rank, alpha and their per-module patterns), the form diffusers' load_lora_weights and synth read.
Metadata (synth_lora, ss_*, modelspec.*) is carried over; OUT is written atomically and never replaces an
existing file unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = ("kohya", "comfyui", "diffusers")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr and exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see python -m synth.lora convert --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m synth.lora", description="LoRA file tools.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    convert = commands.add_parser(
        "convert", help="convert a LoRA file between diffusers' form and kohya's / ComfyUI's",
        description="Convert a LoRA .safetensors file: --to kohya (A1111/Forge, ComfyUI, diffusers), --to comfyui "
                    "(the form ComfyUI reads for the family), --to diffusers (diffusers' load_lora_weights, synth).")
    convert.add_argument("input", metavar="IN", help="the LoRA file to read (.safetensors)")
    convert.add_argument("output", metavar="OUT", help="the file to write (.safetensors); not replaced unless --overwrite")
    convert.add_argument("--to", required=True, help="kohya, comfyui or diffusers")
    convert.add_argument("--family", help="the model family (default: from the file's synth metadata or its keys)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def read_lora(path: str) -> tuple[dict, dict]:
    """The tensors and the __metadata__ of a .safetensors LoRA file."""
    from safetensors import safe_open

    from synth.loras import read_header

    if not str(path).lower().endswith(".safetensors"):
        raise ValueError(f"IN={path}: only .safetensors files are read (pickled .ckpt/.pt files can run code)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"IN={path}: no such file")
    read_header(path)  # a one-line error for a file that is not safetensors
    with safe_open(path, framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})


def file_family(metadata: dict, form: str, given: str | None, keys=()):
    """The family object: --family, else the synth metadata's, else the one the keys imply (None if unknown)."""
    from synth.families import FAMILIES, get_family
    from synth.lora_export import KOHYA, KOHYA_FUSED, OFFICIAL_FUSED
    from synth.loras import SYNTH_METADATA_KEY

    if given is not None:
        if given not in FAMILIES:
            raise ValueError(f"--family={given}: not a family; use one of {', '.join(FAMILIES)}")
        return get_family(given)
    try:
        stored = json.loads(metadata.get(SYNTH_METADATA_KEY, "{}")).get("family")
    except (json.JSONDecodeError, AttributeError):
        stored = None
    if stored in FAMILIES:
        return get_family(stored)
    implied = [name for name in FAMILIES if form == OFFICIAL_FUSED == get_family(name).lora_export_form]
    if form == KOHYA:  # kohya names of an original model's layers (FLUX's double_blocks_...) say their family
        implied = [name for name in FAMILIES if get_family(name).lora_export_form == KOHYA_FUSED
                   and any(marker in key for key in keys for marker in get_family(name).lora_markers)]
    return get_family(implied[0]) if implied else None


def to_diffusers(tensors: dict, form: str, family) -> tuple[dict, dict]:
    """Any form -> (diffusers-form tensors, module -> alpha)."""
    from synth.lora_export import KOHYA, OFFICIAL_FUSED, module_alphas

    if form == KOHYA:
        from synth.lora_export import from_kohya

        return from_kohya(tensors, family)
    if form == OFFICIAL_FUSED:
        from synth.lora_export import from_official_fused

        if family is None:
            raise ValueError("IN: a LoRA in an original model's fused form (base_model.model.*) that does not say its "
                             "family; give --family")
        return from_official_fused(tensors, family.lora_fused_layers, family.denoiser)
    plain = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    return plain, module_alphas(tensors, None, "")


def convert(input_path: str, output_path: str, to: str, family_name: str | None = None, overwrite: bool = False):
    """Convert input_path to the form `to` and write output_path; returns output_path."""
    from synth.lora_export import (
        KOHYA,
        KOHYA_FUSED,
        detect_form,
        dumps,
        peft_config,
        to_form,
        write_safetensors,
    )
    from synth.loras import DIFFUSERS_METADATA_KEY

    # 1. Check the arguments, then read the file.
    if to not in TARGETS:
        raise ValueError(f"--to={to}: use one of {', '.join(TARGETS)}")
    if not str(output_path).lower().endswith(".safetensors"):
        raise ValueError(f"OUT={output_path}: must end in .safetensors")
    if Path(output_path).exists() and not overwrite:
        raise ValueError(f"OUT={output_path}: already exists; pass --overwrite to replace it")
    tensors, metadata = read_lora(input_path)
    form = detect_form(tensors)
    family = file_family(metadata, form, family_name, list(tensors))

    # 2. To diffusers' form first: every conversion goes through it, with each module's alpha.
    if form != KOHYA and DIFFUSERS_METADATA_KEY in metadata:
        stored = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        prefixes = {key.split(".")[0] for key in tensors}
        from synth.lora_export import module_alphas

        alphas = {}
        for prefix in prefixes:
            config = {k[len(prefix) + 1:]: v for k, v in stored.items() if k.startswith(prefix + ".")}
            alphas.update(module_alphas({k: v for k, v in tensors.items() if k.startswith(prefix + ".")}, config, prefix))
        plain = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    else:
        plain, alphas = to_diffusers(tensors, form, family)
    if not plain:
        raise ValueError(f"IN={input_path}: holds no LoRA weights (lora_A/lora_B or lora_down/lora_up tensors)")

    # 3. Then to the asked form, keeping the metadata (diffusers' LoraConfig only where the tensors are diffusers').
    metadata = {k: v for k, v in metadata.items() if k != DIFFUSERS_METADATA_KEY}
    if to == "diffusers":
        out = plain
        config = {}
        for prefix in sorted({key.split(".")[0] for key in plain}):
            config.update({f"{prefix}.{k}": v for k, v in peft_config(plain, alphas, prefix).items()})
        metadata[DIFFUSERS_METADATA_KEY] = dumps(config)
    else:
        target = KOHYA if to == "kohya" else (family.lora_export_form if family else None)
        if to == "kohya" and family is not None and family.lora_export_form == KOHYA_FUSED:
            target = KOHYA_FUSED  # kohya names of the original model's layers (FLUX's), which its tools read
        if target is None:
            raise ValueError(f"--to={to}: the file does not say its family; give --family")
        if target == KOHYA and any(not key.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for key in plain):
            made_for = family.name if family else "a transformer model"
            raise ValueError(f"--to=kohya: this LoRA is for {made_for}, whose tools do not read kohya names; use "
                             "--to comfyui (the form ComfyUI reads for it)")
        out = to_form(target, plain, alphas, family)
    metadata.setdefault("format", "pt")
    return str(write_safetensors(output_path, out, metadata, overwrite=overwrite))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(convert(args.input, args.output, args.to, args.family, args.overwrite))
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    except OSError as error:
        sys.stderr.write(f"error: {error.filename or args.output}: {error.strerror}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
