"""torch.compile of the denoiser (accel.compile) and LoRA hotswap (accel.lora_hotswap): the checks before any
weights load (`check_compile`), and applying them to a built pipeline (`prepare_hotswap`, `compile_denoiser`).

- regional: torch.compile each of the denoiser's repeated blocks (diffusers' ModelMixin.compile_repeated_blocks):
  the blocks of one shape share one graph, so warm-up costs a few block compiles, not the whole model's.
- full: the denoiser's whole forward, compiled in place (the pipeline still calls the same module).

Graphs are specialised to shapes (compile_dynamic=false): one graph per latent/tile shape and batch. What keeps
them reused: every tile of a stage has one shape and a compiled denoiser's last batch of tiles is padded to the
full batch (synth.tiling.tiled_apply); the pipeline cache (synth.pipelines) keeps the compiled denoiser across a
sweep's jobs and the UI's requests; and with accel.lora_hotswap a sweep over LoRA files swaps the adapter weights
in place (diffusers' hotswap) instead of rebuilding the pipeline.

The checks need no weights; the inductor checks import torch.
"""

from __future__ import annotations

import logging
import shutil
import weakref

log = logging.getLogger(__name__)

COMPILES = ("none", "regional", "full")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")
# eager / aot_eager trace and guard exactly as inductor does (same graphs, same recompiles) without generating code
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")

_compiled: weakref.WeakSet = weakref.WeakSet()  # denoisers compile_denoiser compiled (is_compiled asks)


def _bool(accel_cfg, key: str) -> bool:
    value = accel_cfg.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"accel.{key}={value}: choose true or false")
    return value


def check_compile(accel_cfg, device, family, *, offload: str = "none", lora_cfg=None) -> None:
    """Refuse accel's compile and hotswap keys in one line before any weights load: unknown values, a backend
    this machine cannot run, compilation with model offload, hotswap where diffusers' hotswap does not reach or
    a LoRA of a larger rank than accel.lora_hotswap_rank. `device`: the resolved torch.device (or its type)."""
    if accel_cfg is None:
        return
    compile_choice = accel_cfg.get("compile", "none")
    if compile_choice not in COMPILES:
        raise ValueError(f"accel.compile={compile_choice}: choose one of {', '.join(COMPILES)}")
    mode = accel_cfg.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise ValueError(f"accel.compile_mode={mode}: choose one of {', '.join(COMPILE_MODES)}")
    backend = accel_cfg.get("compile_backend", "inductor")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"accel.compile_backend={backend}: choose one of {', '.join(COMPILE_BACKENDS)}")
    _bool(accel_cfg, "compile_dynamic")
    hotswap = _bool(accel_cfg, "lora_hotswap")
    rank = accel_cfg.get("lora_hotswap_rank", 64)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"accel.lora_hotswap_rank={rank}: must be an integer >= 1 (the largest LoRA rank swapped in)")
    device_type = getattr(device, "type", str(device))
    if compile_choice != "none":
        if offload != "none":
            raise ValueError(f"accel.compile={compile_choice} with offload={offload}: offload moves the weights at every "
                             "call, which compiled graphs do not follow; use offload=none or accel.compile=none")
        if mode != "default" and backend != "inductor":
            raise ValueError(f"accel.compile_mode={mode} is an inductor mode; compile_backend={backend} ignores it "
                             "(use compile_backend=inductor or compile_mode=default)")
        if backend == "cudagraphs" and device_type != "cuda":
            raise ValueError(f"accel.compile_backend=cudagraphs records CUDA graphs; this run resolved "
                             f"device={device_type} (use compile_backend=inductor, or eager / aot_eager)")
        if backend == "inductor":
            check_inductor(device_type)
    if hotswap:
        check_hotswap(family, lora_cfg, rank)


def check_inductor(device_type: str) -> None:
    """inductor generates Triton kernels on CUDA and C++ on the CPU: refuse a machine without the compiler."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("accel.compile_backend=inductor on CUDA needs Triton (pip install triton); or use "
                             "compile_backend=cudagraphs / aot_eager")
    elif device_type == "cpu":
        from torch._inductor import config

        candidates = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        if not any(name and shutil.which(name) for name in candidates):
            raise ValueError(f"accel.compile_backend=inductor on the CPU needs a C++ compiler ({', '.join(filter(None, candidates))} "
                             "on PATH); install one, or use compile_backend=eager / aot_eager")


def check_hotswap(family, lora_cfg, rank: int) -> None:
    """Hotswap is diffusers' (the pipelines' load_lora_weights(..., hotswap=True)); a family whose LoRAs load
    through peft directly has none, and a LoRA above the target rank cannot be swapped into the padded layers."""
    from pathlib import Path

    from synth.loras import lora_entries, read_header

    if family.peft_loaded:
        raise ValueError(f"accel.lora_hotswap=true: {family.name}'s LoRAs load through peft directly (diffusers has no "
                         f"{family.name} LoRA loader, so no hotswap); use accel.lora_hotswap=false")
    for path, _ in lora_entries(lora_cfg):
        header = read_header(str(Path(path).expanduser()))
        ranks = [entry["shape"][0] for key, entry in header.items()
                 if key != "__metadata__" and (".lora_A." in key or ".lora_down." in key) and entry.get("shape")]
        if ranks and max(ranks) > rank:
            raise ValueError(f"lora.path={path}: rank {max(ranks)} is above accel.lora_hotswap_rank={rank}; raise "
                             f"accel.lora_hotswap_rank to at least {max(ranks)}")


def hotswapping(accel_cfg) -> bool:
    return accel_cfg is not None and accel_cfg.get("lora_hotswap", False) is True


def compile_key(accel_cfg) -> str:
    """What of accel changes a built pipeline here (for synth.pipelines.pipeline_key)."""
    if accel_cfg is None:
        return "none"
    keys = ("compile", "compile_mode", "compile_backend", "compile_dynamic", "lora_hotswap", "lora_hotswap_rank")
    return ",".join(str(accel_cfg.get(key)) for key in keys)


def prepare_hotswap(pipe, accel_cfg, lora_cfg) -> None:
    """accel.lora_hotswap: diffusers pads the first LoRA's layers to lora_hotswap_rank (and keeps their scales as
    tensors), so that later LoRAs of any rank up to it swap in without new layers or a recompile. Must run
    before the first LoRA loads."""
    from synth.loras import lora_entries

    if hotswapping(accel_cfg) and lora_entries(lora_cfg):
        pipe.enable_lora_hotswap(target_rank=int(accel_cfg.lora_hotswap_rank))


def compile_denoiser(pipe, family, accel_cfg) -> None:
    """torch.compile the pipeline's denoiser as accel.compile asks (none: nothing), after LoRAs and embeddings load."""
    choice = "none" if accel_cfg is None else accel_cfg.get("compile", "none")
    if choice == "none":
        return
    import torch

    from synth.tiled_denoiser import denoiser_of

    model = denoiser_of(pipe)
    mode = accel_cfg.get("compile_mode", "default")
    options = {"backend": accel_cfg.get("compile_backend", "inductor"), "dynamic": bool(accel_cfg.get("compile_dynamic")),
               "mode": None if mode == "default" else mode}
    if choice == "regional":
        # diffusers 0.42 declares _repeated_blocks on UNet2DConditionModel and FluxTransformer2DModel but not on
        # SD3Transformer2DModel or HunyuanDiT2DModel: those families name their block classes
        # (Family.repeated_blocks), set on this instance for diffusers' own compile_repeated_blocks.
        if family.repeated_blocks:
            model._repeated_blocks = list(family.repeated_blocks)
        if not getattr(model, "_repeated_blocks", None):
            raise ValueError(f"accel.compile=regional: {type(model).__name__} names no repeated blocks to compile; "
                             "use accel.compile=full")
        log.info("compiling %s's repeated blocks (%s) with %s", type(model).__name__,
                 ", ".join(model._repeated_blocks), options["backend"])
        model.compile_repeated_blocks(**options)
    else:
        # The forward, as an instance attribute (as accelerate's hooks do), rather than nn.Module.compile: that
        # compiles Module._call_impl, which calls whatever forward is set, so the tiler's per-tile forward
        # (synth.tiled_denoiser) would be traced with its Python tile loop into one graph holding every tile.
        # Here the tiler swaps this forward for its own and calls the compiled one on each batch of tiles.
        log.info("compiling %s's forward with %s", type(model).__name__, options["backend"])
        model.forward = torch.compile(model.forward, **options)
    _compiled.add(model)


def is_compiled(model) -> bool:
    """Whether compile_denoiser compiled this denoiser (the tiler then pads its last batch of tiles)."""
    return model in _compiled
