"""offload=model: diffusers' model CPU offload through the whole staged chain (tiled VAE, ControlNet included)."""

import pytest
import torch
from conftest import compose_infer

from synth import highres, pipelines
from synth.checks import check_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

CALL = {"prompt": "a lighthouse", "num_inference_steps": 2, "guidance_scale": 7.5}


def chain_image(cfg, device, offload):
    width, height = check_inputs(cfg)
    pipe = pipelines.load_pipeline(cfg.model, device, torch.float32, offload)
    image, _ = highres.generate(pipe, dict(CALL), cfg, width, height, seed=0)
    return pipe, image


def test_offloaded_chain_matches_the_resident_one(tmp_path):
    """The hooks run on the CPU too (execution device cpu:0): same pixels, weights back on the CPU between models."""
    cfg = compose_infer(["model=tiny_sd15", "size=256", "controlnet=tile", "highres.vae_tile_size=8"],
                        output_dir=tmp_path)
    _, resident = chain_image(cfg, torch.device("cpu"), "none")
    cfg.offload = "model"
    pipe, offloaded = chain_image(cfg, torch.device("cpu"), "model")
    assert getattr(pipe.unet, "_hf_hook", None) is not None  # really offloaded
    assert resident.tobytes() == offloaded.tobytes()


def test_offload_needs_cuda():
    with pytest.raises(ValueError, match="offload=model moves weights between the CPU and a CUDA GPU; device=cpu"):
        check_inputs(compose_infer(["model=tiny_sd15", "offload=model", "device=cpu"]))
    with pytest.raises(ValueError, match="offload=sequential: choose one of none, model"):
        check_inputs(compose_infer(["model=tiny_sd15", "offload=sequential"]))
    if not torch.cuda.is_available():
        cfg = compose_infer(["model=tiny_sd15", "offload=model"])
        with pytest.raises(ValueError, match="offload=model needs a CUDA device; this run resolved device=cpu"):
            pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_lowers_peak_cuda_memory(tmp_path):
    peaks = {}
    for offload in ("none", "model"):
        cfg = compose_infer(["model=tiny_sdxl", "size=256", "device=cuda", f"offload={offload}"], output_dir=tmp_path)
        torch.cuda.reset_peak_memory_stats()
        chain_image(cfg, torch.device("cuda"), offload)
        peaks[offload] = torch.cuda.max_memory_allocated()
    assert peaks["model"] < peaks["none"]
