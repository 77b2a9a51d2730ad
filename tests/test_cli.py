"""The real command line: images on disk with their paths printed, replay, --help."""

import numpy as np
from conftest import run_cli
from PIL import Image

from synth.images import read_config


def written(result):
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.endswith(".png")]


def test_text2img_prints_paths_and_replays_bit_for_bit(tmp_path):
    first = written(
        run_cli("infer.py", "model=tiny_sdxl", "prompt=a red car", "seed=5", "num_images=2", f"hydra.run.dir={tmp_path}/a", cwd=tmp_path)
    )
    assert [p.split("/")[-1] for p in first] == ["000-seed5.png", "001-seed6.png"]
    original = np.asarray(Image.open(first[1]))

    again = written(run_cli("infer.py", f"replay={first[1]}", f"hydra.run.dir={tmp_path}/b", cwd=tmp_path))
    assert len(again) == 1 and np.array_equal(np.asarray(Image.open(again[0])), original)
    assert read_config(again[0]).seed == 6 and read_config(again[0]).prompt == "a red car"

    # Overrides after replay still apply: a group choice and a plain key.
    changed = written(
        run_cli("infer.py", f"replay={first[1]}", "scheduler=euler", "guidance_scale=2.5", f"hydra.run.dir={tmp_path}/c", cwd=tmp_path)
    )
    stored = read_config(changed[0])
    assert stored.scheduler.name == "euler" and stored.guidance_scale == 2.5 and stored.seed == 6
    assert not np.array_equal(np.asarray(Image.open(changed[0])), original)


def test_int_size_works_as_typed(tmp_path):
    # Hydra refuses an int as a group choice; size is a plain key, so size=96 works verbatim.
    [path] = written(run_cli("infer.py", "model=tiny_kolors", "size=96", f"hydra.run.dir={tmp_path}", cwd=tmp_path))
    assert Image.open(path).size == (96, 96)


def test_help_lists_config_groups(tmp_path):
    result = run_cli("infer.py", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "== Configuration groups ==" in result.stdout
    from synth.config import group_options

    assert "model: " + ", ".join(sorted(group_options("model"))) in result.stdout  # every conf/model file
    assert all(f"tiny_{name}" in group_options("model") for name in ("sd15", "sd3", "sd35_medium", "flux"))
