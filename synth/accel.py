"""The accel group's speed options (conf/accel/, issue #16): checked before any weights load, applied after.

`check_accel_inputs(cfg)` needs no torch (synth.checks runs it with the other input checks); `check_accel(cfg,
device, dtype)` adds what depends on the machine (installed attention kernels, torchao, the GPU's compute
capability) once the device is resolved, still before any weights load. `apply_accel(pipe, family, accel)` turns
the options on in a loaded pipeline, with diffusers', peft's and torchao's own functions. The compile keys and
lora_hotswap are synth.compile's; `apply_train_accel` is the subset that applies to LoRA training.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

QUANTIZE = ("none", "int8_weight_only", "int8_dynamic", "fp8_weight_only", "fp8_dynamic")
VAE = ("none", "slicing")
CACHE = ("none", "first_block")
FP8_CAPABILITY = (8, 9)  # torchao's float8 kernels need Ada / Hopper tensor cores (compute capability >= 8.9)
# diffusers' attention backends that run on a CPU: PyTorch SDPA's own CPU kernels and flex attention (unfused
# without torch.compile). Every other one is a CUDA kernel (flash-attn, sage, xformers, the hub kernels, cuDNN and
# memory-efficient SDPA) or another accelerator's (npu, xla); MPS runs SDPA's default and math kernels.
DEVICE_ATTENTION = {"cpu": ("native", "_native_math", "_native_flash", "flex"), "mps": ("native", "_native_math")}
OTHER_ACCELERATORS = ("_native_npu", "_native_xla")  # synth runs on cuda, cpu and mps only
# The options LoRA training refuses, and why; it takes the rest (apply_train_accel).
TRAIN_REFUSED = {
    "fuse_qkv": "training adds the LoRA to the attention projections (to_q, to_k, to_v) that fusing replaces; "
                "fuse at inference (infer.py accel.fuse_qkv=true) instead",
    "cache": "the first-block cache reuses outputs between denoising steps, which training does not take",
}


# --- checks -------------------------------------------------------------------------------------------------


def check_accel_inputs(cfg) -> None:
    """Refuse accel values that cannot work for this config, in one line, before torch loads."""
    from synth.families import get_family

    accel = cfg.get("accel")
    if accel is None:
        return
    family = get_family(cfg.model.family)
    for key in ("fuse_qkv", "channels_last"):
        if not isinstance(accel.get(key, False), bool):
            raise ValueError(f"accel.{key}={accel.get(key)}: must be true or false")
    for key, allowed in (("quantize", QUANTIZE), ("vae", VAE), ("cache", CACHE)):
        if accel.get(key, "none") not in allowed:
            raise ValueError(f"accel.{key}={accel.get(key)}: choose one of {', '.join(allowed)}")
    attention = accel.get("attention", "native")
    if not isinstance(attention, str):
        raise ValueError(f"accel.attention={attention}: give a diffusers attention backend name, e.g. native")
    if attention != "native" and not family.attention_dispatch:
        raise ValueError(
            f"accel.attention={attention}: the {family.name} denoiser calls PyTorch's attention directly, not "
            "diffusers' attention dispatcher, so no backend can be set for it; use accel.attention=native"
        )
    threshold = accel.get("cache_threshold", 0.05)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
        raise ValueError(f"accel.cache_threshold={threshold}: must be a finite number > 0 (0.05 is diffusers' default)")
    if accel.get("cache", "none") != "none":
        check_cache(cfg, family)
    if accel.get("lora_hotswap", False) and (accel.get("fuse_qkv", False) or accel.get("quantize", "none") != "none"):
        key = "fuse_qkv=true" if accel.get("fuse_qkv", False) else f"quantize={accel.quantize}"
        raise ValueError(f"accel.lora_hotswap=true with accel.{key}: the LoRAs are merged into the fused or quantised "
                         "weights, so there is no adapter left to swap; turn one of them off")


def check_cache(cfg, family) -> None:
    """accel.cache=first_block: a denoiser with diffusers' cache hooks, in a text-to-image run of one stage.

    diffusers' image-to-image pipelines of our families set no cache context (the hooks then fail), and tiles of
    one step would share the cache's state, so image-to-image and high-res refinement are refused.
    """
    from synth.stages import plan_stages

    value = f"accel.cache={cfg.accel.cache}"
    if not family.first_block_cache:
        from synth.families import FAMILIES

        fitting = ", ".join(name for name, each in FAMILIES.items() if each.first_block_cache)
        raise ValueError(f"{value}: diffusers' FirstBlockCache does not support the {family.name} denoiser "
                         f"(it does: {fitting}); use accel.cache=none")
    if cfg.get("init_image") is not None:
        raise ValueError(f"{value}: image-to-image (init_image) sets no cache context in diffusers' {family.name} "
                         "pipeline; use accel.cache=none for image-to-image")
    if cfg.get("highres") is not None:
        from synth.config import parse_size

        width, height = parse_size(cfg.get("size"), cfg.model.native_size)
        steps = cfg.get("num_inference_steps") or cfg.model.num_inference_steps
        if len(plan_stages(cfg.highres, family.name, cfg.model.native_size, width, height, steps)) > 1:
            raise ValueError(f"{value}: size={cfg.get('size')} runs high-res refinement stages (image-to-image on "
                             "tiles), which the cache cannot follow; use accel.cache=none or a size up to the native one")


def check_accel(cfg, device, dtype) -> None:
    """check_accel_inputs, and what the resolved device and dtype must offer (torch, no weights)."""
    import importlib.util

    check_accel_inputs(cfg)
    accel = cfg.get("accel")
    if accel is None:
        return
    device_type = getattr(device, "type", str(device))
    check_attention(str(accel.get("attention", "native")), device_type, dtype)
    quantize = accel.get("quantize", "none")
    if quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"accel.quantize={quantize} needs torchao (pip install torchao); use accel.quantize=none")
    if quantize.startswith("fp8"):
        import torch

        if device_type != "cuda":
            raise ValueError(f"accel.quantize={quantize} needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
                             f"this run is on {device_type}: use int8_weight_only or int8_dynamic")
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_CAPABILITY:
            raise ValueError(f"accel.quantize={quantize} needs CUDA compute capability >= 8.9; this GPU has "
                             f"{capability[0]}.{capability[1]}: use int8_weight_only or int8_dynamic")


def check_attention(name: str, device_type: str, dtype) -> None:
    """A backend diffusers knows, whose package is installed, that runs on this device and dtype."""
    from diffusers.models import attention_dispatch as dispatch

    names = [backend.value for backend in dispatch.AttentionBackendName]
    usable = [each for each in names if _usable(dispatch, each, device_type, dtype)]
    allowed = f"usable here: {', '.join(usable)}"
    if name not in names:
        raise ValueError(f"accel.attention={name}: not a diffusers attention backend; {allowed}")
    backend = dispatch.AttentionBackendName(name)
    try:
        dispatch._check_attention_backend_requirements(backend)  # the package diffusers needs for it
    except RuntimeError as error:
        raise ValueError(f"accel.attention={name}: {str(error).splitlines()[0]} ({allowed})") from None
    if name in OTHER_ACCELERATORS or (device_type != "cuda" and name not in DEVICE_ATTENTION.get(device_type, ())):
        raise ValueError(f"accel.attention={name} needs a CUDA GPU (or another accelerator); this run is on "
                         f"{device_type}: {allowed}")
    half_only = _half_only(dispatch, backend)
    if half_only and dtype not in half_only:
        wanted = " or ".join(str(each).removeprefix("torch.") for each in half_only)
        raise ValueError(f"accel.attention={name} computes in {wanted}; this run's dtype is "
                         f"{str(dtype).removeprefix('torch.')}: set dtype=bf16 (or fp16), or another backend ({allowed})")


def _half_only(dispatch, backend) -> tuple:
    """The dtypes diffusers' own constraints for the backend allow, where they name some (flash, sage, cuDNN)."""
    import torch

    constraints = dispatch._AttentionBackendRegistry._constraints.get(backend) or []
    if getattr(dispatch, "_check_qkv_dtype_bf16", None) in constraints:
        return (torch.bfloat16,)
    if getattr(dispatch, "_check_qkv_dtype_bf16_or_fp16", None) in constraints:
        return (torch.bfloat16, torch.float16)
    return ()


def _usable(dispatch, name: str, device_type: str, dtype) -> bool:
    backend = dispatch.AttentionBackendName(name)
    try:
        dispatch._check_attention_backend_requirements(backend)
    except RuntimeError:
        return False
    if name in OTHER_ACCELERATORS or (device_type != "cuda" and name not in DEVICE_ATTENTION.get(device_type, ())):
        return False
    half_only = _half_only(dispatch, backend)
    return not half_only or dtype in half_only


def check_train_accel(cfg) -> None:
    """The accel options LoRA training refuses (train.py's input checks); the rest are checked as at inference."""
    accel = cfg.get("accel")
    if accel is None:
        return
    for key, reason in TRAIN_REFUSED.items():
        value = accel.get(key)
        if value not in (None, False, "none"):
            raise ValueError(f"accel.{key}={str(value).lower() if isinstance(value, bool) else value}: {reason}")
    check_accel_inputs(cfg)


# --- applying -----------------------------------------------------------------------------------------------


def apply_accel(pipe, family, accel) -> None:
    """Turn accel's options on in a loaded pipeline (its LoRAs and embeddings already in).

    Order: LoRA adapters are merged into the weights first where fusing or quantising follows (fused layers
    replace the adapted ones; peft cannot merge into torchao tensors later); fuse_qkv before quantize, so that the
    fused projections are quantised too (torch.cat cannot join quantised weights); then memory format, attention
    backend, cache hooks and VAE slicing, which change no weights.
    """
    if accel is None:
        return
    denoiser = getattr(pipe, family.denoiser)
    quantize = accel.get("quantize", "none")
    if accel.get("fuse_qkv", False) or quantize != "none":
        merge_adapters(denoiser)
    if accel.get("fuse_qkv", False):
        fuse_qkv(pipe, family)
    if quantize != "none":
        quantize_denoiser(denoiser, quantize)
    if accel.get("channels_last", False):
        to_channels_last(pipe, family)
    set_attention(denoiser, family, str(accel.get("attention", "native")))
    if accel.get("cache", "none") == "first_block":
        from diffusers.hooks import FirstBlockCacheConfig

        denoiser.enable_cache(FirstBlockCacheConfig(threshold=float(accel.cache_threshold)))
    if accel.get("vae", "none") == "slicing":
        pipe.vae.enable_slicing()


def apply_train_accel(pipe, family, accel) -> None:
    """The options that apply to LoRA training, before the adapter is added: a quantised frozen base (peft trains
    its LoRA on torchao's int8 layers, QLoRA-style), channels-last convolutions, the attention backend and VAE
    slicing (the training images' encoding); check_train_accel refused the rest."""
    if accel is None:
        return
    denoiser = getattr(pipe, family.denoiser)
    if accel.get("quantize", "none") != "none":
        quantize_denoiser(denoiser, accel.quantize)
    if accel.get("channels_last", False):
        to_channels_last(pipe, family)
    set_attention(denoiser, family, str(accel.get("attention", "native")))
    if accel.get("vae", "none") == "slicing":
        pipe.vae.enable_slicing()


def merge_adapters(model) -> None:
    """Merge the model's active peft LoRA adapters into its weights at their set scales, and drop the adapter
    layers: diffusers' fuse_qkv_projections reads `to_q.weight`, which under an adapter is the base weight alone,
    so fusing would silently drop the LoRA. (peft's merge, then diffusers' unload_lora / recurse_remove_peft_layers,
    as pipe.fuse_lora + unload_lora_weights do for the models with diffusers' LoRA mixin.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        return
    for layer in layers:
        layer.merge()
    if hasattr(model, "unload_lora"):
        model.unload_lora()
    else:  # Hunyuan-DiT: adapters injected by peft (no diffusers LoRA mixin)
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
    log.info("merged %d LoRA layers into the weights (accel.fuse_qkv / accel.quantize)", len(layers))


def fuse_qkv(pipe, family) -> None:
    """diffusers' fuse_qkv_projections on the denoiser and the VAE (as DiffusionPipeline.fuse_qkv_projections does
    for UNet pipelines; that one reaches only `pipe.unet`)."""
    getattr(pipe, family.denoiser).fuse_qkv_projections()
    if hasattr(pipe.vae, "fuse_qkv_projections"):
        pipe.vae.fuse_qkv_projections()


TORCHAO_CONFIGS = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "fp8_weight_only": "Float8WeightOnlyConfig",
    "fp8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
}


def quantize_denoiser(denoiser, quantize: str) -> None:
    """torchao's quantize_ on the denoiser's Linear layers (the bulk of its weights and time)."""
    import torchao.quantization as quantization

    quantization.quantize_(denoiser, getattr(quantization, TORCHAO_CONFIGS[quantize])())


def to_channels_last(pipe, family) -> None:
    """Channels-last memory for the convolutional models: the VAE, and the denoiser if it is a UNet (a DiT's
    only convolution is its patch embedding; its time goes to Linear layers and attention)."""
    import torch

    for name in ("vae", family.denoiser) if family.denoiser == "unet" else ("vae",):
        getattr(pipe, name).to(memory_format=torch.channels_last)


def set_attention(denoiser, family, name: str) -> None:
    """diffusers' set_attention_backend on a denoiser whose processors use the dispatcher. It also sets the
    process-wide default backend, so a later pipeline with attention=native is set back explicitly."""
    if not family.attention_dispatch:
        return  # check_accel_inputs refused any backend but native
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    if name == "native" and _AttentionBackendRegistry._active_backend.value == "native":
        return  # plain diffusers: nothing to set
    if not any(hasattr(processor, "_attention_backend") for processor in denoiser.attn_processors.values()):
        raise ValueError(f"accel.attention={name}: the loaded {family.name} denoiser's attention processors do not "
                         "use diffusers' attention dispatcher; use accel.attention=native")
    denoiser.set_attention_backend(name)


def reset_cache(denoiser) -> None:
    """Give the next pipeline call a fresh first-block cache: diffusers resets its state at the end of a call
    (maybe_free_model_hooks), which a cancelled or failed call never reaches, and the next image's first step
    would then be compared with (and could reuse) the stale one's last."""
    if getattr(denoiser, "is_cache_enabled", False):
        denoiser._reset_stateful_cache()
