"""Every model x scheduler config composes, and the pure input checks accept and refuse the right values."""

import pytest
from conftest import compose_infer

from synth.checks import check_inputs
from synth.config import (
    check_size,
    fitting_schedulers,
    group_options,
    parse_size,
    scheduler_fits,
)
from synth.families import FAMILIES, get_family

MODELS = group_options("model")
SCHEDULERS = group_options("scheduler")


def test_every_family_has_a_real_config_and_a_twin():
    for family in FAMILIES:
        assert family in MODELS and f"tiny_{family}" in MODELS
    assert "sdxl_turbo" in MODELS and "tiny_sdxl_turbo" in MODELS


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_model_scheduler_composes(model, scheduler):
    cfg = compose_infer([f"model={model}", f"scheduler={scheduler}"])
    for key in ("family", "path", "native_size"):
        assert cfg.model[key] is not None
    if not scheduler_fits(cfg.scheduler, get_family(cfg.model.family)):
        with pytest.raises(ValueError, match=f"scheduler={scheduler} does not fit {cfg.model.family}"):
            check_inputs(cfg)
    elif cfg.model.twin:
        assert check_inputs(cfg) == (cfg.model.native_size, cfg.model.native_size)
    else:  # real weights are never in the test machine's hub cache, and HF_HUB_OFFLINE is set
        with pytest.raises(FileNotFoundError, match="not available offline.*tiny_sd15"):
            check_inputs(cfg)


def test_sdxl_turbo_extends_sdxl():
    turbo, base = compose_infer(["model=sdxl_turbo"]).model, compose_infer(["model=sdxl"]).model
    assert turbo.family == base.family == "sdxl"
    assert (turbo.num_inference_steps, turbo.guidance_scale, turbo.native_size) == (1, 0.0, 512)
    assert turbo.default_scheduler.cls == "diffusers.EulerAncestralDiscreteScheduler"
    assert turbo.cuda_dtype == base.cuda_dtype


def test_flow_schedulers_only_for_sd3():
    assert fitting_schedulers("sd3") == ["default", "flow_euler"]
    assert "flow_euler" not in fitting_schedulers("sd15") and "euler" in fitting_schedulers("sd15")


@pytest.mark.parametrize(
    "size, expected",
    [(None, (512, 512)), (2048, (2048, 2048)), ("2048", (2048, 2048)), ("1216x832", (1216, 832)), ("64X128", (64, 128))],
)
def test_parse_size(size, expected):
    assert parse_size(size, 512) == expected


@pytest.mark.parametrize("size", ["big", "12x", 1.5, True, "x64"])
def test_parse_size_refuses(size):
    with pytest.raises(ValueError, match="size"):
        parse_size(size, 512)


def test_check_size_steps():
    check_size(1216, 832, "sdxl")
    with pytest.raises(ValueError, match="not a multiple of 16"):
        check_size(1000, 1024, "sd3")  # 1000 is fine for UNet families, not for patch-2 DiTs
    check_size(1000, 1024, "sd15")
    with pytest.raises(ValueError, match="out of range"):
        check_size(32768, 512, "sd15")
    with pytest.raises(ValueError, match="out of range"):
        check_size(0, 512, "sd15")
