"""Bad input through the real command line: one line on stderr naming the value, exit code 2, nothing written."""

import pytest
from conftest import run_cli
from PIL import Image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), "red").save(folder / "ok.png")
    Image.new("RGB", (60, 64), "red").save(folder / "odd.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "model.ckpt").write_bytes(b"not looked at")
    (folder / "model.safetensors").write_bytes(b"not looked at")
    return folder


CASES = [
    (["model=foo"], "unknown model 'foo'; choose one of: hunyuan_dit, kolors, sd15"),
    (["scheduler=fast"], "unknown scheduler 'fast'; choose one of: ddim, default"),
    (["model=tiny_sd3", "scheduler=euler"], "scheduler=euler does not fit sd3"),
    (["model=tiny_sd15", "scheduler=flow_euler"], "scheduler=flow_euler does not fit sd15"),
    (["model=tiny_sd3", "size=1000"], "width 1000 is not a multiple of 16"),
    (["model=tiny_sd15", "size=96x63"], "height 63 is not a multiple of 8"),
    (["model=tiny_sd15", "size=0"], "width 0 is out of range"),
    (["model=tiny_sd15", "size=20000"], "width 20000 is out of range"),
    (["model=tiny_sd15", "size=large"], "size='large'"),
    (["model=tiny_sd15", "num_inference_steps=0"], "num_inference_steps=0"),
    (["model=tiny_sd15", "num_images=0"], "num_images=0"),
    (["model=tiny_sd15", "guidance_scale=-1"], "guidance_scale=-1"),
    (["model=tiny_sd15", "device=tpu"], "device=tpu: choose one of auto, cuda, cpu, mps"),
    (["model=tiny_sd15", "dtype=int8"], "dtype=int8: choose one of auto, fp16, bf16, fp32"),
    (["model=tiny_sd15", "init_image={d}/ok.png", "denoise_strength=1.5"], "denoise_strength=1.5: must be in (0, 1]"),
    (["model=tiny_sd15", "init_image={d}/ok.png", "denoise_strength=0"], "denoise_strength=0: must be in (0, 1]"),
    (["model=tiny_sd15", "init_image={d}/missing.png"], "missing.png: no such file"),
    (["model=tiny_sd15", "init_image={d}/broken.png"], "broken.png: not a readable image"),
    (["model=tiny_sd15", "init_image={d}/odd.png"], "its size 60x64 is not a multiple of 8"),
    (["model=sd15", "model.path=no such model"], "neither an existing local path nor a hub id"),
    (["model=sd15", "model.path={d}"], "has no model_index.json"),
    (["model=sd15"], "stable-diffusion-v1-5/stable-diffusion-v1-5: weights are not available offline"),
    (["model=sd15", "model.path={d}/model.ckpt"], "only .safetensors single-file checkpoints"),
    (["model=kolors", "model.path={d}/model.safetensors"], "kolors has no single-file format"),
    (["model=sd15", "model.path={d}/none.safetensors"], "none.safetensors: no such file"),
    (["replay={d}/ok.png"], "ok.png: the image has no synth metadata"),
    (["replay={d}/missing.png"], "missing.png: no such file"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(args, message, files, tmp_path):
    args = [arg.format(d=files) for arg in args] + ["hydra.run.dir=" + str(tmp_path / "run")]
    result = run_cli("infer.py", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not list(tmp_path.rglob("*.png")), "nothing is written on bad input"
