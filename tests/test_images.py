"""PNG files: provenance chunks round-trip, nothing is overwritten, a failed write leaves no file, outputs follow
the umask, stale temp files go; input images are read as a viewer shows them, hostile ones refused."""

import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from synth.images import (
    CONFIG_KEY,
    PARAMETERS_KEY,
    open_image_as_viewed,
    read_config,
    read_text,
    remove_stale_temps,
    save_png,
    temp_owner,
)
from synth.sweep import read_jobs


def test_text_chunks_round_trip(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "blue"), tmp_path, "a", {PARAMETERS_KEY: "a cat\nSteps: 2", CONFIG_KEY: "seed: 3\n"})
    assert read_text(path)[PARAMETERS_KEY] == "a cat\nSteps: 2"
    assert read_config(path).seed == 3


def test_existing_image_is_never_overwritten(tmp_path):
    first = save_png(Image.new("RGB", (8, 8), "blue"), tmp_path, "img", {})
    second = save_png(Image.new("RGB", (8, 8), "red"), tmp_path, "img", {})
    assert first.name == "img.png" and second.name == "img-1.png"
    assert Image.open(first).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img.png"]


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(Image.new("RGB", (8, 8)), tmp_path, "img", {})
    assert list(tmp_path.iterdir()) == []


# --- input images as a viewer shows them (synth.images.open_image_as_viewed) --------------------------------


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width, height, bit_depth, colour_type, raw, extra=b""):
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    image = open_image_as_viewed(tmp_path / "grey16.png")
    assert image.mode == "RGB" and [image.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]


def test_16_bit_colour_png_reads_as_8_bit(tmp_path):
    row = b"\0" + struct.pack(">HHH", 32896, 0, 65535) * 2
    (tmp_path / "rgb16.png").write_bytes(png_bytes(2, 2, 16, 2, row * 2))
    assert open_image_as_viewed(tmp_path / "rgb16.png").getpixel((1, 1)) == (128, 0, 255)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    palette = Image.new("P", (1, 1), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert [open_image_as_viewed(tmp_path / "rgba.png").getpixel((x, 0)) for x in (0, 1)] == [(255,) * 3, (255, 0, 0)]
    assert open_image_as_viewed(tmp_path / "palette.png").getpixel((0, 0)) == (255,) * 3
    assert open_image_as_viewed(tmp_path / "la.png").getpixel((0, 0)) == (255,) * 3
    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert open_image_as_viewed(tmp_path / "cmyk.jpg").mode == "RGB"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    stored = Image.new("RGB", (64, 48), "red")
    stored.paste((0, 0, 255), (0, 0, 32, 48))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    stored.save(tmp_path / f"photo{suffix}", exif=exif.tobytes(), quality=95)
    image = open_image_as_viewed(tmp_path / f"photo{suffix}")
    assert image.size == (48, 64)
    top, bottom = image.getpixel((24, 4)), image.getpixel((24, 60))
    assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]  # stored left (blue) is shown on top
    from synth.config import check_init_image

    assert check_init_image(str(tmp_path / f"photo{suffix}")) == (48, 64)


BOMBS = [((30000, 30000), "900000000 pixels"), ((10000, 10000), "10000x10000 = 100000000 pixels")]


@pytest.mark.parametrize("size, shown", BOMBS)
def test_decompression_bomb_is_refused_naming_file_size_and_limit(tmp_path, size, shown, recwarn):
    # 30000^2 is over twice PIL's limit (PIL raises); 10000^2 only over it (PIL would only warn and decode)
    (tmp_path / "bomb.png").write_bytes(png_bytes(*size, 8, 2, b"\0" * 64))
    for read, what in ((open_image_as_viewed, "init_image"), (read_config, "replay")):
        with pytest.raises(ValueError) as error:
            read(tmp_path / "bomb.png")
        message = str(error.value)
        assert message.startswith(f"{what}=") and "bomb.png" in message and shown in message
        assert f"limit of {Image.MAX_IMAGE_PIXELS} pixels" in message and "\n" not in message
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_truncated_and_corrupt_images_are_refused_naming_the_file(tmp_path):
    whole = save_png(Image.new("RGB", (32, 32), "blue"), tmp_path, "whole", {CONFIG_KEY: "seed: 3\n"}).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "no_end.png").write_bytes(whole[:-12])  # pixels complete, IEND missing
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    for name in ("cut.png", "text.png"):
        with pytest.raises(ValueError, match=f"init_image=.*{name}: not a readable image"):
            open_image_as_viewed(tmp_path / name)
    for name in ("cut.png", "no_end.png", "text.png"):
        with pytest.raises(ValueError, match=f"replay=.*{name}: not a readable image"):
            read_config(tmp_path / name)


def test_read_text_finds_chunks_after_the_pixels_without_decoding_them(tmp_path, monkeypatch):
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_KEY, "before")
    info.add(b"iTXt", CONFIG_KEY.encode() + b"\0\0\0\0\0" + "seed: 5  # 猫\n".encode(), after_idat=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "late.png", pnginfo=info)

    def no_decoding(self):
        raise AssertionError("read_text decoded the pixels")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert read_text(tmp_path / "late.png") == {PARAMETERS_KEY: "before", CONFIG_KEY: "seed: 5  # 猫\n"}
    assert read_config(tmp_path / "late.png").seed == 5


# --- outputs: permissions, temp files ------------------------------------------------------------------------

SAVE_UNDER_UMASK = """
import os, sys
from pathlib import Path
from PIL import Image
from synth.images import save_png
os.umask(int(sys.argv[1], 8))  # set after import: save_png reads the umask per call
print(oct(save_png(Image.new("RGB", (4, 4)), Path(sys.argv[2]), "x", {}).stat().st_mode & 0o777))
"""


@pytest.mark.parametrize("umask, mode", [("022", "0o644"), ("027", "0o640"), ("077", "0o600")])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    result = subprocess.run([sys.executable, "-c", SAVE_UNDER_UMASK, umask, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == mode
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()  # exited and reaped: nothing runs under this pid now
    return process.pid


def test_stale_temps_are_removed_live_ones_kept(tmp_path):
    host = temp_owner().split("@", 1)[1]
    dead = tmp_path / f".tmp-{dead_pid()}@{host}-abc123_x.png"
    dead_recent = tmp_path / f".tmp-{dead_pid()}@{host}-abc456_x.png"  # may be a writer in another pid namespace
    live = tmp_path / f".tmp-{os.getppid()}@{host}-def456_y.png"  # the parent of this test process runs
    mine = tmp_path / f".tmp-{os.getpid()}@{host}-ghi789_z.png"
    other_host_new = tmp_path / f".tmp-{dead_pid()}@elsewhere-jkl012.png"  # its pid means nothing here
    other_host_old = tmp_path / f".tmp-{dead_pid()}@elsewhere-mno345.png"
    legacy_old = tmp_path / ".tmp-pqr678.png"  # older synth: no owner in the name
    for file in (dead, dead_recent, live, mine, other_host_new, other_host_old, legacy_old):
        file.write_bytes(b"\x89PNG partial")
    two_minutes_ago, two_days_ago = time.time() - 120, time.time() - 2 * 24 * 3600
    for file in (dead, live, mine):
        os.utime(file, (two_minutes_ago, two_minutes_ago))
    for file in (other_host_old, legacy_old):
        os.utime(file, (two_days_ago, two_days_ago))
    path = save_png(Image.new("RGB", (4, 4)), tmp_path, "img", {})  # cleans up before it writes
    kept = [path, dead_recent, live, mine, other_host_new]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    assert remove_stale_temps(tmp_path) == []


def test_contact_sheet_lists_only_the_latest_sweeps_images(tmp_path):
    """A sweep repeated into its folder: the job's values, images and failure come from the latest run."""
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    Image.new("RGB", (4, 4)).save(job / "000-seed0.png")
    (job / "failed.txt").write_text("boom\n")
    (job / ".tmp-1@host-abcdef.png").write_bytes(b"\x89PNG partial")
    earlier = time.time() - 60
    for file in (job / ".hydra" / "overrides.yaml", job / "000-seed0.png", job / "failed.txt"):
        os.utime(file, (earlier, earlier))
    (job / ".hydra-1").mkdir()
    (job / ".hydra-1" / "overrides.yaml").write_text("- seed=5\n")
    Image.new("RGB", (4, 4)).save(job / "000-seed5.png")
    [read] = read_jobs(tmp_path, ["seed"])
    assert read.values == {"seed": "5"} and [p.name for p in read.images] == ["000-seed5.png"] and read.error is None


def test_corrupt_exif_reads_unrotated_without_warnings(tmp_path, recwarn):
    Image.new("RGB", (16, 8), "red").save(tmp_path / "bad.jpg", exif=b"Exif\0\0MM\0*\0\0\0\x08\xff\xff garbage")
    assert open_image_as_viewed(tmp_path / "bad.jpg").size == (16, 8)  # as a viewer: no usable orientation
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
