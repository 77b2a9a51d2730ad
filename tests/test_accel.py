"""The accel group (GPU speed options) on the CPU twins: what each option does to the models and the pixels, that
the options compose, the refusals (one line, exit 2, before any weights load), training's subset, and the pipeline
cache. Tolerances are in 8-bit pixel levels of the written PNGs."""

import math

import numpy as np
import pytest
import torch
from conftest import compose_infer, run_cli
from omegaconf import OmegaConf, open_dict
from PIL import Image
from train_utils import compose_train, make_dataset

from synth import pipelines
from synth.accel import check_accel, check_train_accel
from synth.families import get_family
from synth.infer import infer

pytestmark = pytest.mark.usefixtures("one_thread")  # the same reduction order every run: pixel comparisons
CPU = torch.device("cpu")


def render(tmp_path, *overrides):
    """(pixels as int16, the pipeline that made them) of a 64 px infer run with overrides."""
    folder = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    cfg = compose_infer(["size=64", *overrides], output_dir=folder)
    path = infer(cfg)[0]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), pipelines._cache["pipe"]


def mean_difference(a, b) -> float:
    return float(np.abs(a - b).mean())


def is_torchao(tensor) -> bool:
    return type(tensor).__module__.startswith("torchao")


def linear_layers(model):
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)]


# --- configs -------------------------------------------------------------------------------------------------


def test_every_entry_point_has_the_group_and_fast_only_changes_its_keys():
    from hydra import compose, initialize_config_dir
    from conftest import CONF

    none = OmegaConf.load(f"{CONF}/accel/none.yaml")
    for config_name in ("infer", "train", "ui"):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            plain = compose(config_name=config_name)
            fast = compose(config_name=config_name, overrides=["accel=fast"])
        assert OmegaConf.to_container(plain.accel) == OmegaConf.to_container(none)
        changed = {key for key in none if fast.accel[key] != none[key]}
        assert changed == {"name", "compile", "fuse_qkv", "channels_last"}, config_name


# --- what each option does -----------------------------------------------------------------------------------


def test_attention_math_backend_runs_and_matches_native(tmp_path, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    plain, _ = render(tmp_path, "model=tiny_flux")
    calls = []
    math_backend = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]

    def counted(*args, **kwargs):
        calls.append(1)
        return math_backend(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, counted)
    chosen, pipe = render(tmp_path, "model=tiny_flux", "accel.attention=_native_math")
    # 2 steps x (1 double + 1 single block): the math kernel really ran, not SDPA's default choice
    assert len(calls) >= 4
    assert {p._attention_backend for p in pipe.transformer.attn_processors.values()} == {AttentionBackendName._NATIVE_MATH}
    assert np.abs(chosen - plain).max() <= 1  # the same attention up to float rounding

    # The next pipeline with attention=native is set back (set_attention_backend also sets a process default).
    calls.clear()
    again, _ = render(tmp_path, "model=tiny_flux", "accel.vae=slicing")
    assert not calls and np.abs(again - plain).max() <= 1


def test_channels_last_and_vae_slicing_keep_the_pixels(tmp_path):
    plain, _ = render(tmp_path, "model=tiny_sd15")
    image, pipe = render(tmp_path, "model=tiny_sd15", "accel.channels_last=true", "accel.vae=slicing")
    for model in (pipe.unet, pipe.vae):
        convolutions = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    assert pipe.vae.use_slicing
    assert np.abs(image - plain).max() <= 1

    # A DiT keeps its own layout (its time is in Linear layers); its VAE still goes channels-last.
    _, pipe = render(tmp_path, "model=tiny_sd3", "accel.channels_last=true")
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipe.transformer.pos_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_flux", pytest.param("tiny_sdxl", marks=SLOW),
                                   pytest.param("tiny_sd3", marks=SLOW), pytest.param("tiny_hunyuan_dit", marks=SLOW)])
def test_fuse_qkv_fuses_the_projections_and_keeps_the_pixels(model, tmp_path):
    plain, _ = render(tmp_path, f"model={model}")
    image, pipe = render(tmp_path, f"model={model}", "accel.fuse_qkv=true")
    denoiser = denoiser_of(pipe, model)
    fused = [name for name, _ in denoiser.named_modules() if name.endswith((".to_qkv", ".to_kv"))]
    assert fused, "diffusers' fuse_qkv_projections made fused layers"
    assert any(name.endswith(".to_qkv") for name, _ in pipe.vae.named_modules())
    assert np.abs(image - plain).max() <= 2  # the same matmuls, concatenated: float rounding only


def denoiser_of(pipe, model: str):
    return getattr(pipe, get_family(compose_infer([f"model={model}"]).model.family).denoiser)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    from test_lora_infer import LazyLoras

    return LazyLoras(tmp_path_factory.mktemp("loras"))


@pytest.mark.parametrize("family", ["sd15", "hunyuan_dit"])  # diffusers' LoRA loader; peft's (no LoRA mixin)
def test_fuse_qkv_merges_loras_first(family, loras, tmp_path):
    # scale 0.2: the random test LoRA at full scale pushes a twin where guidance amplifies float rounding to
    # whole pixel levels; at 0.2 it still changes the image by ~20 levels on average.
    lora = [f"model=tiny_{family}", "lora=default", f"lora.path={loras[family]}", "lora.scale=0.2"]
    plain, _ = render(tmp_path, f"model=tiny_{family}")
    with_lora, pipe = render(tmp_path, *lora)
    assert mean_difference(with_lora, plain) > 2, "the LoRA changes the image"
    # What diffusers alone does: under a peft adapter `to_q.weight` is the base weight, so the fused layer lacks
    # the LoRA's delta (and the fused processor no longer calls the adapted to_q / to_k / to_v).
    attention = next(m for m in getattr(pipe, get_family(family).denoiser).modules() if hasattr(m, "fuse_projections")
                     and hasattr(m.to_q, "base_layer"))
    base = torch.cat([attention.to_q.base_layer.weight, attention.to_k.base_layer.weight,
                      attention.to_v.base_layer.weight])
    attention.fuse_projections()
    assert torch.equal(attention.to_qkv.weight, base)

    fused, pipe = render(tmp_path, *lora, "accel.fuse_qkv=true")
    denoiser = getattr(pipe, get_family(family).denoiser)
    assert not [name for name, _ in denoiser.named_modules() if "lora_" in name], "adapters merged and removed"
    assert np.abs(fused - with_lora).max() <= 2  # the LoRA is in the fused weights, at its scale


def test_quantize_merges_loras_first(loras, tmp_path):
    lora = ["model=tiny_sd15", "lora=default", f"lora.path={loras['sd15']}", "lora.scale=0.2"]
    plain, _ = render(tmp_path, "model=tiny_sd15")
    with_lora, _ = render(tmp_path, *lora)
    image, pipe = render(tmp_path, *lora, "accel.quantize=int8_weight_only")
    assert not [name for name, _ in pipe.unet.named_modules() if "lora_" in name], "merged, then quantised"
    assert all(is_torchao(layer.weight) for layer in linear_layers(pipe.unet))
    # the quantised model keeps the LoRA: far nearer the LoRA's image than the plain one
    assert mean_difference(image, with_lora) < 0.2 * mean_difference(with_lora, plain)


@pytest.mark.parametrize("quantize, model", [("int8_weight_only", "tiny_sd15"), ("int8_dynamic", "tiny_flux"),
                                             pytest.param("int8_dynamic", "tiny_sd15", marks=SLOW),
                                             pytest.param("int8_weight_only", "tiny_flux", marks=SLOW)])
def test_int8_quantize_quantises_the_denoiser_and_keeps_the_image_close(quantize, model, tmp_path):
    plain, _ = render(tmp_path, f"model={model}")
    other_seed, _ = render(tmp_path, f"model={model}", "seed=1")
    image, pipe = render(tmp_path, f"model={model}", f"accel.quantize={quantize}")
    denoiser = denoiser_of(pipe, model)
    layers = linear_layers(denoiser)
    assert layers and all(is_torchao(layer.weight) for layer in layers)
    assert not is_torchao(next(pipe.vae.parameters())), "only the denoiser"
    # int8 per-channel weights carry ~0.4 % error per layer; random-weight twins amplify it through their few
    # layers, so closeness is measured against what the next seed changes: well under a tenth of it.
    assert 0 < mean_difference(image, plain) < 0.1 * mean_difference(other_seed, plain)


def test_first_block_cache_skips_blocks_and_stays_close(tmp_path):
    steps = ["model=tiny_flux", "num_inference_steps=8"]

    def tail_runs(*overrides):
        """(pixels, how often the last single block computed): a hook on a layer inside the block."""
        cfg = compose_infer(["size=64", *steps, *overrides], output_dir=tmp_path / f"c{len(overrides)}")
        pipe = pipelines.get_pipeline(cfg, CPU, torch.float32)
        runs = []
        hook = pipe.transformer.single_transformer_blocks[-1].norm.register_forward_hook(lambda *_: runs.append(1))
        try:
            path = infer(cfg)[0]
        finally:
            hook.remove()
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), len(runs)

    plain, full_runs = tail_runs()
    other_seed, _ = tail_runs("seed=1")
    cached, cached_runs = tail_runs("accel.cache=first_block", "accel.cache_threshold=0.5")
    assert full_runs == 8 and 1 <= cached_runs < full_runs
    assert mean_difference(cached, plain) < 0.05 * mean_difference(other_seed, plain)
    # The state is fresh for every image, even after a call that stopped mid-way (a Cancel, a failure) and so
    # never reached diffusers' reset at the end of a call.
    # A cancel after the first step of the same render leaves that step's state: unreset, the next render's first
    # step would match it and skip its blocks.
    import threading

    from synth.step_hooks import Cancelled, observe

    cancel = threading.Event()
    cfg = compose_infer(["size=64", *steps, "accel.cache=first_block", "accel.cache_threshold=0.5"],
                        output_dir=tmp_path / "cancelled")
    with observe(cancel, lambda *_: cancel.set()), pytest.raises(Cancelled):
        infer(cfg)
    again, again_runs = tail_runs("accel.cache=first_block", "accel.cache_threshold=0.5")
    assert again_runs == cached_runs and np.array_equal(again, cached)


def test_all_options_compose(tmp_path):
    everything = ["accel.attention=_native_math", "accel.fuse_qkv=true", "accel.channels_last=true",
                  "accel.quantize=int8_weight_only", "accel.vae=slicing", "accel.cache=first_block"]
    plain, _ = render(tmp_path, "model=tiny_flux")
    other_seed, _ = render(tmp_path, "model=tiny_flux", "seed=1")
    image, pipe = render(tmp_path, "model=tiny_flux", *everything)
    attention = pipe.transformer.transformer_blocks[0].attn
    assert attention.fused_projections and is_torchao(attention.to_qkv.weight), "fused, then the fused layer quantised"
    assert pipe.transformer.is_cache_enabled and pipe.vae.use_slicing
    assert mean_difference(image, plain) < 0.1 * mean_difference(other_seed, plain)

    unet_options = ["accel.fuse_qkv=true", "accel.channels_last=true", "accel.quantize=int8_dynamic", "accel.vae=slicing"]
    plain, _ = render(tmp_path, "model=tiny_sd15")
    other_seed, _ = render(tmp_path, "model=tiny_sd15", "seed=1")
    image, pipe = render(tmp_path, "model=tiny_sd15", *unet_options)
    assert is_torchao(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv.weight)
    assert mean_difference(image, plain) < 0.1 * mean_difference(other_seed, plain)


def test_pipeline_is_rebuilt_when_accel_changes_only():
    cfg = compose_infer(["model=tiny_sd15"])
    first = pipelines.get_pipeline(cfg, CPU, torch.float32)
    loads = pipelines.load_count
    with open_dict(cfg):
        cfg.seed, cfg.prompt = 7, "another prompt"
    assert pipelines.get_pipeline(cfg, CPU, torch.float32) is first and pipelines.load_count == loads
    with open_dict(cfg):
        cfg.accel.channels_last = True
    second = pipelines.get_pipeline(cfg, CPU, torch.float32)
    assert second is not first and pipelines.load_count == loads + 1
    assert second.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# --- refusals ------------------------------------------------------------------------------------------------

REFUSED = [
    (["model=tiny_sd15", "accel.quantize=int4"], "accel.quantize=int4: choose one of none, int8_weight_only"),
    (["model=tiny_sd15", "accel.vae=tiled"], "accel.vae=tiled: choose one of none, slicing"),
    (["model=tiny_sd15", "accel.fuse_qkv=yes"], "accel.fuse_qkv=yes: must be true or false"),
    (["model=tiny_flux", "accel.cache_threshold=0"], "accel.cache_threshold=0: must be a finite number > 0"),
    (["model=tiny_flux", "accel.attention=fast"], "accel.attention=fast: not a diffusers attention backend; usable "
                                                  "here: flex, native, _native_math"),
    (["model=tiny_flux", "accel.attention=flash"], "accel.attention=flash: Flash Attention backend 'flash' is not usable"),
    (["model=tiny_flux", "accel.attention=_native_cudnn"], "accel.attention=_native_cudnn needs a CUDA GPU"),
    (["model=tiny_sd15", "accel.attention=_native_math"], "the sd15 denoiser calls PyTorch's attention directly"),
    (["model=tiny_sd15", "accel.quantize=fp8_weight_only"], "accel.quantize=fp8_weight_only needs a CUDA GPU of compute "
                                                            "capability >= 8.9"),
    (["model=tiny_sd3", "accel.cache=first_block"], "FirstBlockCache does not support the sd3 denoiser (it does: flux)"),
    (["model=tiny_flux", "accel.cache=first_block", "init_image=x.png"], "image-to-image (init_image) sets no cache "
                                                                         "context"),
    (["model=tiny_flux", "accel.cache=first_block", "size=1024"], "size=1024 runs high-res refinement stages"),
    (["model=tiny_flux", "accel.fuse_qkv=true", "accel.lora_hotswap=true"], "accel.lora_hotswap=true with "
                                                                           "accel.fuse_qkv=true"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_refused_values_name_the_key(overrides, message):
    with pytest.raises(ValueError) as error:
        check_accel(compose_infer(overrides), CPU, torch.float32)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_gpu_only_options_follow_the_device(monkeypatch):
    """What this CPU machine cannot show directly: a GPU's compute capability and installed kernels, faked."""
    from diffusers.models import attention_dispatch

    cuda = torch.device("cuda")
    fp8 = compose_infer(["model=tiny_flux", "accel.quantize=fp8_dynamic"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # an RTX 3090
    with pytest.raises(ValueError, match=r"accel.quantize=fp8_dynamic needs CUDA compute capability >= 8.9; this GPU "
                                         r"has 8.6"):
        check_accel(fp8, cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    check_accel(fp8, cuda, torch.bfloat16)

    monkeypatch.setattr(attention_dispatch, "_check_attention_backend_requirements", lambda backend: None)
    check_accel(compose_infer(["model=tiny_flux", "accel.attention=sage"]), cuda, torch.bfloat16)
    with pytest.raises(ValueError, match="accel.attention=sage needs a CUDA GPU"):
        check_accel(compose_infer(["model=tiny_flux", "accel.attention=sage"]), CPU, torch.float32)
    with pytest.raises(ValueError, match="accel.attention=_native_cudnn computes in bfloat16 or float16; this run's "
                                         "dtype is float32"):
        check_accel(compose_infer(["model=tiny_flux", "accel.attention=_native_cudnn"]), torch.device("cuda"),
                    torch.float32)


# The device checks import torch and diffusers (~10 s each here): one runs by default, the others with -m slow.
CLI_REFUSED = [
    ("infer.py", ["model=tiny_flux", "accel.attention=flash"], "accel.attention=flash: Flash Attention backend"),
    pytest.param("infer.py", ["model=tiny_sd15", "accel.quantize=fp8_dynamic"],
                 "accel.quantize=fp8_dynamic needs a CUDA GPU", marks=SLOW),
    ("infer.py", ["model=tiny_sd15", "accel.cache=first_block"], "does not support the sd15 denoiser"),
    ("infer.py", ["accel=turbo"], "unknown accel 'turbo'; choose one of: fast, none"),
    pytest.param("ui.py", ["model=tiny_flux", "accel.attention=xformers"],
                 "accel.attention=xformers: Xformers Attention", marks=SLOW),
    ("train.py", ["model=tiny_sd15", "accel.fuse_qkv=true"], "accel.fuse_qkv=true: training adds the LoRA"),
    ("train.py", ["model=tiny_flux", "accel.cache=first_block"], "accel.cache=first_block: the first-block cache"),
]


@pytest.mark.parametrize("script, args, message", CLI_REFUSED)
def test_cli_refusal_is_one_line_before_weights_load(script, args, message, tmp_path):
    cache = tmp_path / "cache"  # an empty twin cache: a twin built here would mean weights were about to load
    extra = ["data.path=" + str(make_dataset(tmp_path / "data", count=1))] if script == "train.py" else []
    result = run_cli(script, *args, *extra, "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path,
                     env={"SYNTH_CACHE_DIR": str(cache)})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not cache.exists() or not any(cache.rglob("model_index.json")), "no weights were built or loaded"


# --- training ------------------------------------------------------------------------------------------------


def test_training_refuses_inference_only_options(tmp_path):
    for overrides, message in ((["accel.fuse_qkv=true"], "accel.fuse_qkv=true: training adds the LoRA"),
                               (["model=tiny_flux", "accel.cache=first_block"], "accel.cache=first_block: the first")):
        with pytest.raises(ValueError, match=message):
            check_train_accel(compose_train(["model=tiny_sd15", *overrides], output_dir=tmp_path))


def test_training_takes_a_quantised_base_channels_last_and_the_attention_backend(tmp_path):
    from synth.train.run import fit

    data = make_dataset(tmp_path / "data")
    cfg = compose_train(["model=tiny_sd15", f"data.path={data}", "optim.optimizer.lr=1e-2",
                         "accel.quantize=int8_weight_only", "accel.channels_last=true", "accel.vae=slicing"],
                        output_dir=tmp_path / "run")
    result = fit(cfg)
    assert math.isfinite(result.trainer.callback_metrics["train/loss"].item())
    unet = result.module.denoiser
    base_layers = [m.base_layer for m in unet.modules() if hasattr(m, "base_layer")]
    assert base_layers and all(is_torchao(layer.weight) for layer in base_layers), "LoRA on int8 layers (QLoRA-style)"
    lora_b = [p for name, p in unet.named_parameters() if "lora_B" in name]
    assert lora_b and all(not is_torchao(p) for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b), "it trained"
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    flux = compose_train(["model=tiny_flux", f"data.path={data}", "accel.attention=_native_math"],
                         output_dir=tmp_path / "flux")
    module = fit(flux).module
    assert {p._attention_backend.value for p in module.denoiser.attn_processors.values()} == {"_native_math"}


# --- replay ---------------------------------------------------------------------------------------------------


def test_replay_takes_the_accel_options_from_the_png_unless_overridden(tmp_path):
    from synth.replay import replay_config

    image, _ = render(tmp_path, "model=tiny_sd15", "accel=fast", "accel.vae=slicing")
    png = next(tmp_path.glob("run0/*.png"))
    replayed = replay_config(compose_infer([f"replay={png}"], output_dir=tmp_path / "replayed"), [f"replay={png}"])
    assert (replayed.accel.name, replayed.accel.fuse_qkv, replayed.accel.vae) == ("fast", True, "slicing")
    again = np.asarray(Image.open(infer(replayed)[0]).convert("RGB"), dtype=np.int16)
    assert np.array_equal(again, image)
    overrides = [f"replay={png}", "accel=none"]
    plain = replay_config(compose_infer(overrides, output_dir=tmp_path / "plain"), overrides)
    assert OmegaConf.to_container(plain.accel) == OmegaConf.to_container(compose_infer([]).accel)
