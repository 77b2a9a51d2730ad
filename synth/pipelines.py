"""Build diffusers pipelines from a model config: device, dtype, loading, scheduler, and reuse across jobs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from synth.accel import apply_accel
from synth.compile import check_compile, compile_denoiser, compile_key, hotswapping, prepare_hotswap
from synth.config import is_single_file, offline_error
from synth.families import get_family
from synth.loras import lora_entries, load_loras, lora_key
from synth.textual_inversion import add_embeddings, embeddings_key, read_embeddings

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The last pipeline built, kept so that a sweep's jobs in one process reuse it (issue #6 builds on this).
_cache: dict = {"key": None, "pipe": None}
load_count = 0  # how many pipelines were loaded from disk in this process (tests count reloads)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda: CUDA is not available on this machine; use device=cpu or device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device=mps: MPS is not available on this machine; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, model_cfg: DictConfig) -> torch.dtype:
    """dtype=auto: the family's CUDA dtype on CUDA (fp16, or bf16 for Kolors), fp32 elsewhere."""
    if name == "auto":
        return DTYPES[model_cfg.cuda_dtype] if device.type == "cuda" else torch.float32
    return DTYPES[name]


def ensure_weights(model_cfg: DictConfig) -> None:
    """Offline twins are built into model.path on first use; everything else must already be there."""
    from synth.twins import ensure_model_twin

    ensure_model_twin(model_cfg)


def load_pipeline(model_cfg: DictConfig, device: torch.device, dtype: torch.dtype, offload: str = "none"):
    """Load the family's text-to-image pipeline from a diffusers folder, hub id or single file.

    offload="model" keeps the weights on the CPU and moves each model to `device` while it runs
    (diffusers' enable_model_cpu_offload); the pipeline then reports the CPU as `pipe.device` and `device`
    as `pipe._execution_device`.
    """
    global load_count
    family = get_family(model_cfg.family)
    ensure_weights(model_cfg)
    cls = family.pipeline_class("text2img")
    kwargs = {"dtype": dtype, **family.load_kwargs(model_cfg)}
    path = str(model_cfg.path)
    log.info("loading %s pipeline from %s (%s, %s)", family.name, path, device, str(dtype).removeprefix("torch."))
    try:
        if is_single_file(path):
            pipe = cls.from_single_file(str(Path(path).expanduser()), config=model_cfg.single_file_config, **kwargs)
        else:
            if model_cfg.get("variant"):
                kwargs["variant"] = model_cfg.variant
            if Path(path).expanduser().exists():
                # A local folder loads .safetensors only: with use_safetensors=None diffusers and transformers fall
                # back to unpickling .bin files (synth.config.check_no_pickles refuses such folders up front).
                kwargs["use_safetensors"] = True
            pipe = cls.from_pretrained(path, **kwargs)
    except OSError as error:
        message = str(error).lower()
        if not Path(path).expanduser().exists() and ("offline" in message or "connect" in message):
            raise offline_error(path) from error
        raise
    load_count += 1
    family.check_loaded(pipe, model_cfg)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def pipeline_key(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> str:
    """What must match for a built pipeline to be reused: the model config, device, dtype, LoRAs and compilation.
    With accel.lora_hotswap only the number of LoRAs: other files of that count are swapped in (get_pipeline)."""
    loras = f"hotswap:{len(lora_entries(cfg.get('lora')))}" if hotswapping(cfg.get("accel")) else lora_key(cfg.get("lora"))
    return (
        OmegaConf.to_yaml(cfg.model, resolve=True) + f"{device}|{dtype}|{cfg.get('offload', 'none')}"
        + f"|{loras}"
        + f"|{embeddings_key(cfg)}"  # textual inversion adds tokens to the tokenizers and encoders
        + "|" + OmegaConf.to_yaml(cfg.get("accel") or {}, resolve=True)  # fused, quantised, hooked: another pipeline
        + f"|{compile_key(cfg.get('accel'))}"
    )


def get_pipeline(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """The text-to-image pipeline for cfg, reused when the model, device and dtype match the last one."""
    key = pipeline_key(cfg, device, dtype)
    family, accel, loras = get_family(cfg.model.family), cfg.get("accel"), cfg.get("lora")
    hotswap = hotswapping(accel)
    if _cache["key"] != key:
        _cache["key"], _cache["pipe"] = None, None  # drop the old pipeline before loading the next
        embeddings = read_embeddings(cfg)  # read safely and parsed before any weights load
        offload = cfg.get("offload", "none")
        if offload != "none" and device.type != "cuda":
            raise ValueError(f"offload={offload} needs a CUDA device; this run resolved device={device.type}")
        check_compile(accel, device, family, offload=offload, lora_cfg=loras)
        pipe = load_pipeline(cfg.model, device, dtype, offload)
        prepare_hotswap(pipe, accel, loras)  # before the first LoRA loads
        load_loras(pipe, family, loras, hotswap)  # into text-to-image: from_pipe shares them
        add_embeddings(pipe, family, embeddings)
        apply_accel(pipe, family, accel)  # after the LoRAs: fusing merges them
        compile_denoiser(pipe, family, accel)
        _cache["pipe"], _cache["key"], _cache["loras"] = pipe, key, lora_key(loras)
        _cache["base_scheduler"] = _cache["pipe"].scheduler
    elif hotswap and _cache.get("loras") != lora_key(loras):
        check_compile(accel, device, family, lora_cfg=loras)  # the new files' ranks
        _cache["loras"] = None  # a swap that fails half way leaves no pipeline claiming either set
        load_loras(_cache["pipe"], family, loras, hotswap)  # swapped in place: no reload, no recompile
        _cache["loras"] = lora_key(loras)
    pipe = _cache["pipe"]
    pipe.scheduler = make_scheduler(cfg, _cache["base_scheduler"])
    return pipe


def make_scheduler(cfg: DictConfig, base):
    """The scheduler the config asks for, built from the weights' scheduler config (so betas, shift and
    prediction type stay the family's)."""
    choice = cfg.scheduler if cfg.scheduler.cls else cfg.model.get("default_scheduler")
    if not choice:
        return base.__class__.from_config(base.config)  # a fresh copy: schedulers hold per-run state
    kwargs = OmegaConf.to_container(choice.kwargs, resolve=True) if choice.get("kwargs") else {}
    return get_class(choice.cls).from_config(base.config, **kwargs)


def for_task(pipe, family_name: str, task: str):
    """The pipeline for task, sharing pipe's components (no second copy of the weights)."""
    if task == "text2img":
        return pipe
    cls = get_family(family_name).pipeline_class(task)
    return cls.from_pipe(pipe)
