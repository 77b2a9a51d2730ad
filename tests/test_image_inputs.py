"""Input images as a viewer shows them, hostile images refused in one line, outputs that survive a killed
writer and a repeated run: all through the real command line."""

import os
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf
from PIL import Image

from synth.images import temp_owner
from synth.sweep import read_jobs

EXIF_ROTATE_90_CW = 6  # EXIF Orientation 6: the camera was held upright; viewers turn the stored image 90 degrees


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: a header may claim any size, whatever the (tiny) pixel data holds."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def portrait_photo(path, stored_size=(64, 48)):
    """A landscape-stored image whose EXIF says: show me turned, as portrait."""
    exif = Image.Exif()
    exif[0x0112] = EXIF_ROTATE_90_CW
    Image.new("RGB", stored_size, (200, 40, 40)).save(path, exif=exif.tobytes())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-inputs")
    Image.fromarray(np.full((64, 64), 32896, np.uint16)).save(folder / "grey16.png")  # 16-bit mid-grey
    Image.new("L", (64, 64), 128).save(folder / "grey8.png")
    Image.new("L", (64, 64), 255).save(folder / "white.png")  # what the 16-bit image used to be read as
    portrait_photo(folder / "portrait.jpg")
    portrait_photo(folder / "portrait.png")
    portrait_photo(folder / "portrait_odd.jpg", (64, 44))  # shown 44x64: not a multiple of 8
    (folder / "bomb.png").write_bytes(png_bytes(30000, 30000, 8, 2, b"\0" * 100))  # 900 Mpx claimed, ~100 bytes
    whole = (folder / "grey8.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return folder


@pytest.fixture(scope="module")
def sweep(inputs, tmp_path_factory):
    """One multirun over five init images, into a sweep folder where a killed writer left a truncated temp
    file (dead pid) and a live process is mid-write (this test process's pid)."""
    root = tmp_path_factory.mktemp("sweep-run")
    sweep_dir = root / "sweep"
    truncated = (inputs / "truncated.png").read_bytes()
    host = temp_owner().split("@", 1)[1]
    (sweep_dir / "0").mkdir(parents=True)
    (sweep_dir / "1").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid is free
    stale = sweep_dir / "0" / f".tmp-{dead.pid}@{host}-stale001.png"
    live = sweep_dir / "1" / f".tmp-{os.getpid()}@{host}-live0001.png"
    stale.write_bytes(truncated)
    live.write_bytes(truncated)
    killed_at = time.time() - 120  # untouched for two minutes: see synth.images.DEAD_TEMP_SECONDS
    for file in (stale, live):
        os.utime(file, (killed_at, killed_at))
    names = ["grey16.png", "grey8.png", "white.png", "portrait.jpg", "portrait.png"]
    choices = ",".join(f"'{inputs / name}'" for name in names)
    result = run_cli(
        "infer.py", "-m", "model=tiny_sd15", "num_inference_steps=2", "denoise_strength=0.5",
        f"init_image=choice({choices})", f"hydra.sweep.dir={sweep_dir}", cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return sweep_dir, result, stale, live


def output(sweep_dir, job):
    [path] = [p for p in (sweep_dir / str(job)).glob("*.png") if not p.name.startswith(".")]
    return Image.open(path)


def test_16_bit_init_image_reads_as_mid_grey_not_white(sweep):
    sweep_dir = sweep[0]
    grey16, grey8, white = (np.asarray(output(sweep_dir, job).convert("RGB")) for job in (0, 1, 2))
    assert np.array_equal(grey16, grey8), "16-bit 32896/65535 is read as the 8-bit 128 image"
    assert not np.array_equal(grey16, white)


def test_exif_rotated_init_image_gives_a_portrait_output(sweep):
    sweep_dir = sweep[0]
    assert output(sweep_dir, 3).size == (48, 64)  # JPEG
    assert output(sweep_dir, 4).size == (48, 64)  # PNG with an eXIf chunk


def test_stale_temp_is_removed_and_the_sheet_is_written(sweep):
    sweep_dir, result, stale, live = sweep
    assert not stale.exists(), "a temp file of a dead writer is cleaned up"
    assert live.exists(), "a live process's temp file is never deleted"
    assert str(sweep_dir / "contact_sheet.png") in result.stdout, result.stderr
    with Image.open(sweep_dir / "contact_sheet.png") as sheet:
        sheet.load()
    job = read_jobs(sweep_dir, ["init_image"])[1]
    assert [p.name for p in job.images] == ["000-seed0.png"], "hidden temp files are never listed"


HOSTILE = [
    ("init_image", "bomb.png", "900000000 pixels is over the limit of 89478485 pixels"),
    ("init_image", "truncated.png", "not a readable image"),
    ("replay", "bomb.png", "900000000 pixels"),  # synth.replay reads the chunk; see also tests/test_images.py
]


@pytest.mark.parametrize("key, name, message", HOSTILE, ids=[f"{key}={name}" for key, name, _ in HOSTILE])
def test_hostile_image_is_one_line_and_exit_2(inputs, tmp_path, key, name, message):
    assert (inputs / "bomb.png").stat().st_size < 1024  # the bomb is small on disk; only its header is huge
    result = run_cli("infer.py", "model=tiny_sd15", f"{key}={inputs / name}", f"hydra.run.dir={tmp_path}/run",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), result.stderr
    assert name in lines[0] and message in lines[0]
    assert not list(tmp_path.rglob("*.png"))


def test_init_image_size_is_checked_after_exif_rotation(inputs, tmp_path):
    result = run_cli("infer.py", "model=tiny_sd15", f"init_image={inputs / 'portrait_odd.jpg'}",
                     f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "its size 44x64 is not a multiple of 8" in result.stderr  # as shown, not as stored (64x44)


def test_second_run_into_a_folder_keeps_the_first_runs_config(tmp_path):
    run = tmp_path / "run"
    first_run = run_cli("infer.py", "model=tiny_sd15", "num_inference_steps=2", "seed=1", f"hydra.run.dir={run}",
                        cwd=tmp_path)
    assert first_run.returncode == 0, first_run.stderr
    # the second run is refused by its input check, after Hydra has written its files: fast, and the same path
    second_run = run_cli("infer.py", "model=tiny_sd15", "num_inference_steps=0", "seed=2", "prompt=a dog",
                         f"hydra.run.dir={run}", cwd=tmp_path)
    assert second_run.returncode == 2, second_run.stderr
    first, second = run / ".hydra", run / ".hydra-1"
    assert OmegaConf.load(first / "config.yaml").seed == 1 and OmegaConf.load(second / "config.yaml").seed == 2
    assert OmegaConf.load(first / "config.yaml").prompt != "a dog" == OmegaConf.load(second / "config.yaml").prompt
    assert "seed=1" in OmegaConf.load(first / "overrides.yaml")
    assert "seed=2" in OmegaConf.load(second / "overrides.yaml")
    assert (first / "hydra.yaml").is_file() and (second / "hydra.yaml").is_file()
    assert [p.name for p in run.glob("*.png")] == ["000-seed1.png"]
