"""LoRA adapters for training: the peft config per family, freezing, and export in diffusers' format.

The adapters go on the denoiser only (UNet or transformer); text encoders and VAE stay frozen. UNet families
and SD3 get them through diffusers' PEFT mixin (``add_adapter``); Hunyuan-DiT's transformer has no mixin, so
peft's ``inject_adapter_in_model`` does the same job there.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from synth.loras import denoiser_prefix, save_lora

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


def export_lora(path, denoiser, cfg: DictConfig, family) -> str:
    """Write the trained LoRA as a diffusers-format .safetensors file with synth's metadata."""
    config = adapter_config(cfg.lora, family)
    metadata = {
        "family": family.name,
        "base_model": str(cfg.model.path),
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "target_modules": config["target_modules"],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    return str(save_lora(path, lora_state_dict(denoiser), denoiser_prefix(family), config, metadata))
