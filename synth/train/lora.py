"""LoRA adapters for training: the peft config per family, freezing, and export (diffusers' format and the
forms ComfyUI and A1111/Forge read: synth.lora_export).

The adapters go on the denoiser only (UNet or transformer); text encoders and VAE stay frozen. UNet families
and SD3 get them through diffusers' PEFT mixin (``add_adapter``); Hunyuan-DiT's transformer has no mixin, so
peft's ``inject_adapter_in_model`` does the same job there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from synth.loras import denoiser_prefix

ADAPTER = "default"


def adapter_config(lora_cfg: DictConfig, family) -> dict:
    """The peft LoraConfig arguments for lora_cfg (JSON-serialisable: it goes into the file's metadata)."""
    targets = lora_cfg.target_modules
    targets = list(targets if targets is not None else family.default_lora_targets)
    init = lora_cfg.init
    return {
        "r": int(lora_cfg.rank),
        "lora_alpha": float(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout),
        "init_lora_weights": init if isinstance(init, (bool, str)) else bool(init),
        "target_modules": targets,
    }


def add_lora(denoiser: torch.nn.Module, lora_cfg: DictConfig, family) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add a trainable LoRA adapter in fp32, and return the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    denoiser.requires_grad_(False)
    config = LoraConfig(**adapter_config(lora_cfg, family))
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config, adapter_name=ADAPTER)
    else:  # Hunyuan-DiT: diffusers' HunyuanDiT2DModel lacks the PEFT mixin
        inject_adapter_in_model(config, denoiser, adapter_name=ADAPTER)
    params = [param for name, param in denoiser.named_parameters() if "lora_" in name]
    if not params:
        raise ValueError(
            f"lora.target_modules={config.target_modules}: no layer of the {family.name} denoiser matched; "
            f"the defaults are {list(family.default_lora_targets)}"
        )
    for param in params:
        # Mixed precision keeps frozen weights in fp16/bf16; the LoRA weights and their Adam state stay fp32.
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def lora_state_dict(denoiser: torch.nn.Module) -> dict:
    """The adapter's weights under peft names without the adapter name (diffusers' on-disk names)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=ADAPTER)


def export_lora(path, denoiser, cfg: DictConfig, family, steps: int | None = None, tools_file: bool = False) -> str:
    """Write the trained LoRA: path in diffusers' format (diffusers and synth load it) and, with tools_file (the
    final LoRA of a run), beside it the form ComfyUI / A1111 read (Family.lora_export_form;
    synth.lora_export.sibling_path names it), both with synth's metadata and kohya's ss_* training metadata. Two
    files, because diffusers refuses the .alpha tensors ComfyUI needs in its own format, and reads kohya files only
    without diffusers' LoraConfig metadata. Step files stay one per step (`python -m synth.lora convert` makes
    the other form of any of them). Returns path."""
    from synth.lora_export import kohya_metadata, module_alphas, sibling_path, steps_metadata, to_form, write_safetensors
    from synth.loras import DIFFUSERS_METADATA_KEY, SYNTH_METADATA_KEY

    # 1. The adapter's weights under diffusers' names, and each module's alpha (the trained scale x rank).
    config = adapter_config(cfg.lora, family)
    prefix = denoiser_prefix(family)
    tensors = {f"{prefix}.{key}": tensor.detach().to("cpu") for key, tensor in lora_state_dict(denoiser).items()}
    alphas = module_alphas(tensors, config, prefix)

    # 2. The metadata every file carries: synth's, diffusers' LoraConfig, kohya's ss_* and the model spec.
    synth = {
        "family": family.name,
        "base_model": str(cfg.model.path),
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "target_modules": config["target_modules"],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    metadata = {
        "format": "pt",
        # diffusers reads this back into a LoraConfig (rank, alpha, target modules) when loading.
        DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
        SYNTH_METADATA_KEY: json.dumps(synth, sort_keys=True, default=str),
        **kohya_metadata(cfg, family, config["r"], config["lora_alpha"], Path(path).name.split(".")[0]),
        **(steps_metadata(steps) if steps is not None else {}),
    }

    # 3. The files: diffusers' form, then the tools' form beside it; its alphas are tensors, so it carries no
    #    LoraConfig (diffusers refuses a kohya file that has both).
    write_safetensors(path, tensors, metadata)
    if not tools_file:
        return str(path)
    tools = to_form(family.lora_export_form, tensors, alphas, family)
    tools_metadata = {k: v for k, v in metadata.items() if k != DIFFUSERS_METADATA_KEY}
    write_safetensors(sibling_path(path, family.lora_export_form), tools, tools_metadata)
    return str(path)
