"""Bad highres settings through the real command line: one line on stderr naming the value, exit 2, nothing written."""

import pytest
from conftest import run_cli

CASES = [
    (["model=tiny_sd15", "highres.tile_size=16", "highres.tile_overlap=16"], "highres.tile_overlap=16: must be an integer in [0, tile_size=16)"),
    (["model=tiny_sd15", "highres.tile_size=16", "highres.tile_overlap=20"], "highres.tile_overlap=20"),
    (["model=tiny_sd15", "highres.tile_size=12"], "highres.tile_size=12: must be a positive multiple of 8"),
    (["model=tiny_sd3", "highres.tile_size=5"], "highres.tile_size=5: must be a positive multiple of 2"),
    (["model=tiny_sd15", "highres.vae_tile_size=4"], "highres.vae_tile_size=4"),
    (["model=tiny_sd15", "size=256", "highres.stages=[{size:128,strength:0.5},{size:128,strength:0.5}]"],
     "highres.stages[1].size=128: stage sizes must increase"),
    (["model=tiny_sd15", "size=256", "highres.stages=[{size:256,strength:0.5},{size:128x256,strength:0.5}]"],
     "stage sizes must increase"),
    (["model=tiny_sd15", "size=256", "highres.stages=[{size:256,strength:1.5}]"], "highres.stages[0].strength=1.5: strengths must be in (0, 1]"),
    (["model=tiny_sd15", "size=256", "highres.stages=[{size:256,strength:0}]"], "strength=0: strengths must be in (0, 1]"),
    (["model=tiny_sd15", "size=256", "highres.stages=[{size:128,strength:0.5}]"], "the last stage is 128x128 but size is 256x256"),
    (["model=tiny_sd15", "highres.strengths.sd15=[0.7,-0.1]"], "highres.strengths.sd15=-0.1: strengths must be in (0, 1]"),
    (["model=tiny_sd15", "highres.tiled=maybe"], "highres.tiled=maybe: choose auto, true or false"),
    (["model=tiny_sd15", "highres.upscale=bicubic"], "highres.upscale=bicubic: choose one of lanczos, latent"),
    (["model=tiny_sd15", "highres.tile_batch_size=0"], "highres.tile_batch_size=0"),
    (["model=tiny_sd15", "highres.tile_device=gpu"], "highres.tile_device=gpu: choose one of auto, cpu"),
    (["model=tiny_sd3", "size=4096", "highres.tiled=false"], "sd3 cannot run untiled at 4096x4096"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_highres_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = run_cli("infer.py", *args, "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not list(tmp_path.rglob("*.png")), "nothing is written on bad input"
