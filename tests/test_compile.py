"""accel.compile / accel.lora_hotswap (synth/compile.py): refusals before loading, no recompiles after warm-up
across a tiled highres stage, a sweep's jobs and the UI's requests, compiled output equal to eager, and LoRA
hotswap without reload or recompile.

Graphs are counted with torch._dynamo's own counter (counters["stats"]["unique_graphs"]); compile_backend=eager
traces and guards exactly as inductor does (the same graphs and recompiles) without generating code, so these
tests run in seconds on the tiny twins.
"""

import numpy as np
import pytest
import torch
from conftest import CONF, compose_infer, run_cli
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lora_infer import make_lora

from synth import pipelines
from synth.compile import check_compile, is_compiled
from synth.families import get_family
from synth.infer import infer
from synth.tiled_denoiser import denoiser_of
from synth.tiling import tile_layout, tiled_apply

EAGER = ["accel.compile_backend=eager"]
BASE = ["model=tiny_sdxl", "device=cpu", "num_inference_steps=2"]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh():
    """No compiled graphs or pipeline from an earlier test: each test counts its own warm-up."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() keeps the counters
    pipelines._cache.update(key=None, pipe=None)
    yield
    torch._dynamo.reset()
    pipelines._cache.update(key=None, pipe=None)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run(tmp_path, *overrides):
    """The pixels of `python infer.py` with BASE and overrides (a model= among them replaces tiny_sdxl)."""
    base = [item for item in BASE if not item.startswith("model=")] if any(
        item.startswith("model=") for item in overrides) else BASE
    cfg = compose_infer([*base, *overrides], output_dir=tmp_path)
    return pixels(infer(cfg)[0])


def accel(**keys):
    return OmegaConf.merge(OmegaConf.load(f"{CONF}/accel/none.yaml"), keys)


# --- refusals, before any weights load -------------------------------------------------------------------


@pytest.mark.parametrize("keys, message", [
    ({"compile": "fast"}, "accel.compile=fast: choose one of none, regional, full"),
    ({"compile": "full", "compile_mode": "turbo"}, "accel.compile_mode=turbo: choose one of"),
    ({"compile": "full", "compile_backend": "tvm"}, "accel.compile_backend=tvm: choose one of"),
    ({"compile": "full", "compile_backend": "eager", "compile_mode": "max-autotune"}, "is an inductor mode"),
    ({"compile": "regional", "compile_backend": "cudagraphs"}, "records CUDA graphs; this run resolved device=cpu"),
    ({"compile_dynamic": "yes"}, "accel.compile_dynamic=yes: choose true or false"),
    ({"lora_hotswap": 1}, "accel.lora_hotswap=1: choose true or false"),
    ({"lora_hotswap": True, "lora_hotswap_rank": 0}, "accel.lora_hotswap_rank=0: must be an integer >= 1"),
])
def test_bad_accel_values_are_refused(keys, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_compile(accel(**keys), torch.device("cpu"), get_family("sdxl"))


def test_compile_with_offload_and_hotswap_without_a_diffusers_loader_are_refused(tmp_path):
    with pytest.raises(ValueError, match="offload=model: offload moves the weights"):
        check_compile(accel(compile="regional"), "cuda", get_family("sdxl"), offload="model")
    with pytest.raises(ValueError, match="hunyuan_dit's LoRAs load through peft directly"):
        check_compile(accel(lora_hotswap=True), "cpu", get_family("hunyuan_dit"))
    check_compile(accel(lora_hotswap=True), "cpu", get_family("sdxl"))  # hotswap alone: swaps without a reload


def test_cli_refuses_in_one_line_before_loading(tmp_path):
    result = run_cli("infer.py", *BASE, "accel.compile=fast", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith("accel.compile=fast: choose one of none, regional, full"), result.stderr
    assert "loading" not in result.stderr


# --- the tiler pads a compiled denoiser's last batch -----------------------------------------------------


def test_padded_last_batch_gives_the_same_blend_with_one_batch_shape():
    x = torch.randn(2, 4, 20, 20, dtype=torch.float64)
    tiles = tile_layout(20, 20, 8, 2)  # 3 x 3 tiles: batches of 4, 4 and 1
    seen = []

    def fn(chunk, crops):
        seen.append(len(chunk))
        return torch.tanh(crops) * 2  # pointwise: the blend of tiles equals the untiled result

    padded = tiled_apply(fn, x, tiles, 2, 4, pad_last_batch=True)
    assert seen == [4, 4, 4]
    assert torch.allclose(padded, torch.tanh(x) * 2)
    seen.clear()
    assert torch.equal(tiled_apply(fn, x, tiles, 2, 4), padded) and seen == [4, 4, 1]


# --- no recompiles after warm-up ---------------------------------------------------------------------------


@pytest.mark.parametrize("model, mode", [("tiny_sdxl", "regional"), pytest.param("tiny_sdxl", "full", marks=pytest.mark.slow),
                                         ("tiny_sd3", "full")])
def test_tiled_highres_stage_with_a_ragged_batch_compiles_one_shape(model, mode, fresh, tmp_path, one_thread):
    compiled = [f"model={model}", f"accel.compile={mode}", *EAGER]
    run(tmp_path / "native", *compiled)  # 64 px: one untiled shape (the CFG batch of 2, an 8 x 8 latent)
    one_shape = graphs()
    assert one_shape > 0 and is_compiled(denoiser_of(pipelines._cache["pipe"]))
    # 192 px: the base stage at 64 px (as above), then a 24 x 24 latent in 4 x 4 tiles of 8 (overlap 2), 5 tiles
    # per call: 5, 5, 5 and a last call of 1 tile, padded to 5. The tiles add one shape (10 x 4 x 8 x 8), not two.
    hires = ["size=192", "highres.tile_size=8", "highres.tile_overlap=2", "highres.tile_batch_size=5"]
    loads = pipelines.load_count
    run(tmp_path / "hires", *compiled, *hires)
    assert pipelines.load_count == loads  # the same compiled pipeline
    assert graphs() == 2 * one_shape
    run(tmp_path / "again", *compiled, *hires, "seed=3", "prompt=a red bicycle", "guidance_scale=7.5")
    assert graphs() == 2 * one_shape  # warm: no recompile


def test_sweep_jobs_reuse_the_compiled_denoiser(fresh, tmp_path, one_thread):
    loads = pipelines.load_count
    jobs = [("seed=0", "prompt=a cat", "guidance_scale=5"), ("seed=1", "prompt=a dog", "guidance_scale=5"),
            ("seed=2", "prompt=a very long prompt about a lighthouse at dusk", "guidance_scale=7.5"),
            ("seed=3", "prompt=a cat", "guidance_scale=2.5")]
    images = []
    for index, job in enumerate(jobs):
        images.append(run(tmp_path / str(index), "accel.compile=regional", *EAGER, *job))
        if index == 0:
            warm = graphs()
    assert warm > 0 and graphs() == warm  # 0 recompiles across 3 more jobs
    assert pipelines.load_count == loads + 1
    assert not np.array_equal(images[0], images[1])  # the jobs did change the image


def test_ui_requests_reuse_the_compiled_denoiser(fresh, tmp_path, one_thread):
    from synth.ui_requests import Generator, Settings

    base = compose_infer(BASE)
    generator = Generator(base, [*BASE, "accel.compile=regional", *EAGER], tmp_path, {"model": "tiny_sdxl"})
    loads = pipelines.load_count
    generator.generate(Settings(prompt="a cat", seed=1, guidance_scale=5.0))
    warm = graphs()
    generator.generate(Settings(prompt="a dog on a beach", seed=2, guidance_scale=6.0))
    generator.generate(Settings(prompt="a cat", seed=3, guidance_scale=3.0))
    assert warm > 0 and graphs() == warm
    assert pipelines.load_count == loads + 1


# --- compiled output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_hunyuan_dit", "tiny_flux"])
def test_regional_compiles_the_dit_blocks_the_family_names(model, fresh, tmp_path, one_thread):
    """SD3 and Hunyuan-DiT name their blocks (Family.repeated_blocks); FLUX's come from diffusers."""
    eager = run(tmp_path / "eager", f"model={model}")
    compiled = run(tmp_path / "compiled", f"model={model}", "accel.compile=regional", *EAGER)
    assert graphs() > 0
    assert np.abs(compiled - eager).max() <= 1


@pytest.mark.slow
def test_inductor_on_the_cpu_equals_eager(fresh, tmp_path, one_thread):
    eager = run(tmp_path / "eager")
    compiled = run(tmp_path / "compiled", "accel.compile=full", "accel.compile_backend=inductor")
    assert graphs() > 0
    assert np.abs(compiled - eager).max() <= 2  # inductor fuses and reorders float32 math


# --- LoRA hotswap ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return (make_lora("sdxl", folder / "a.safetensors", seed=1, rank=4),
            make_lora("sdxl", folder / "b.safetensors", seed=2, rank=8, alpha=4.0))


def test_hotswap_sweep_over_loras_swaps_in_place(two_loras, fresh, tmp_path, one_thread):
    a, b = two_loras
    fresh_a, fresh_b = (run(tmp_path / f"fresh{i}", f"lora.path={path}") for i, path in enumerate((a, b)))
    assert not np.array_equal(fresh_a, fresh_b)
    loads = pipelines.load_count
    swap = ["accel.compile=regional", *EAGER, "accel.lora_hotswap=true", "accel.lora_hotswap_rank=8"]
    first = run(tmp_path / "a", *swap, f"lora.path={a}")
    warm = graphs()
    second = run(tmp_path / "b", *swap, f"lora.path={b}")
    back = run(tmp_path / "a2", *swap, f"lora.path={a}")
    assert pipelines.load_count == loads + 1  # one build, two swaps
    assert warm > 0 and graphs() == warm  # no recompile
    for name, swapped, expected in (("a", first, fresh_a), ("b", second, fresh_b), ("a again", back, fresh_a)):
        assert np.abs(swapped - expected).max() <= 1, name


def test_hotswap_refuses_a_lora_above_the_rank_and_one_diffusers_cannot_read(two_loras, fresh, tmp_path):
    a, b = two_loras
    with pytest.raises(ValueError, match=r"rank 8 is above accel.lora_hotswap_rank=4; raise"):
        run(tmp_path, "accel.lora_hotswap=true", "accel.lora_hotswap_rank=4", f"lora.path={b}")
    # A text-encoder layer sends the file to synth's merge (diffusers 0.42 drops text-encoder LoRAs)
    pipe = pipelines.load_pipeline(compose_infer(BASE).model, torch.device("cpu"), torch.float32)
    q_proj = pipe.text_encoder.encoder.layers[0].self_attn.q_proj
    tensors = load_file(a)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, q_proj.in_features)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(q_proj.out_features, 4)
    merged = tmp_path / "with_text_encoder.safetensors"
    save_file(tensors, merged)
    with pytest.raises(ValueError, match="accel.lora_hotswap=true: lora.path=.*with_text_encoder.safetensors is not "
                                         "read by diffusers' LoRA loader"):
        run(tmp_path, "accel.lora_hotswap=true", f"lora.path={merged}")


@pytest.mark.slow  # ~40 s: two processes' start; test_hotswap_sweep_over_loras_swaps_in_place covers it in-process
def test_cli_hotswap_sweep_loads_once(two_loras, tmp_path):
    a, b = two_loras
    result = run_cli("infer.py", "-m", *BASE, "accel.compile=regional", *EAGER, "accel.lora_hotswap=true",
                     "accel.lora_hotswap_rank=8", f"lora.path={a},{b}", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("loading sdxl pipeline") == 1, "the sweep swaps the LoRA into one pipeline"
    first, second = (pixels(next((tmp_path / "sweep" / job).glob("*.png"))) for job in ("0", "1"))
    assert not np.array_equal(first, second)
