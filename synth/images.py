"""PNG files with provenance (the resolved config, atomic no-overwrite writes; the A1111 `parameters` text is
synth.a1111's) and the one way synth reads an image it is given (init images, datasets): as an image viewer shows it."""

from __future__ import annotations

import os
import re
import socket
import struct
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps, PngImagePlugin

PARAMETERS_KEY = "parameters"  # the text chunk A1111, ComfyUI and image viewers read
CONFIG_KEY = "synth-config"  # the resolved synth config of exactly this image, as YAML
TEMP_PREFIX = ".tmp-"  # save_png's temporary files: hidden, so no viewer, glob or contact sheet takes them for outputs
STALE_TEMP_SECONDS = 24 * 3600  # a temp file whose writer cannot be checked (another host) is stale after a day
DEAD_TEMP_SECONDS = 60  # and one whose pid is gone after a minute untouched: a writer in another pid namespace
# (a container sharing this folder and host name) looks dead from here, but it touches its file while it writes
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


# --- reading the images a user gives ------------------------------------------------------------------------


def open_image_as_viewed(path: str | Path, what: str = "init_image") -> Image.Image:
    """The image at `path` as an 8-bit RGB image, the way an image viewer shows it.

    - EXIF orientation is applied (a portrait phone photo stays portrait).
    - 16-bit greyscale is scaled to 8 bits (PIL alone clips it to white); 16-bit colour PNGs PIL already reduces.
    - Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white, as on a web
      page: the colour stored under a fully transparent pixel is arbitrary (often black), so dropping the
      alpha channel would show the model something nobody sees. CMYK and other modes go through PIL's convert.
    - Images over PIL.Image.MAX_IMAGE_PIXELS are refused (PIL only warns below twice that), and so is any file
      PIL cannot decode completely (truncated, corrupt): each as one ValueError naming `what`=path.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what}={path}: no such file")
    try:
        with open_within_limit(file, what, path) as opened, quiet_pil():
            opened.load()  # decodes everything now: a truncated file fails here, not halfway through a run
            return to_rgb(ImageOps.exif_transpose(opened))  # a new image, independent of the file
    except TooManyPixels:
        raise
    except Exception as error:  # noqa: BLE001
        # PIL's decoders report a malformed file as OSError, SyntaxError, ValueError, EOFError, struct.error,
        # zlib.error, ...; each means the same to the user: this file cannot be used
        raise ValueError(f"{what}={path}: not a readable image ({type(error).__name__}: {error})") from None


class TooManyPixels(ValueError):
    """An image over PIL.Image.MAX_IMAGE_PIXELS: refused before its pixels are decoded."""


def open_within_limit(file: Path, what: str, shown_path) -> Image.Image:
    """Image.open (header only) with PIL's decompression-bomb limit as a hard limit: PIL only warns between
    MAX_IMAGE_PIXELS and twice that, and names neither the file nor the size when it refuses."""
    with quiet_pil():
        try:
            image = Image.open(file)
        except Image.DecompressionBombError as error:  # over twice the limit: PIL's message has only the count
            found = re.search(r"\((\d+) pixels\)", str(error))
            check_pixel_count((int(found.group(1)) if found else Image.MAX_IMAGE_PIXELS + 1, 1), what, shown_path)
            raise
    try:
        check_pixel_count(image.size, what, shown_path)
    except TooManyPixels:
        image.close()
        raise
    return image


@contextmanager
def quiet_pil():
    """Silence PIL's warnings while it reads a file: the size warning (an over-limit image is refused with the
    file and size in the message instead) and corrupt-EXIF UserWarnings (a broken EXIF block only means no
    orientation, as in a viewer). Either would be a stray stderr line. catch_warnings is process-wide, but an
    "ignore" can at worst hide such a warning from another thread, never raise one there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def check_pixel_count(size: tuple[int, int], what: str, path) -> None:
    limit = Image.MAX_IMAGE_PIXELS  # PIL's limit (89478485, e.g. 9459 x 9459); a program may change it, or None
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        shown = f"{size[0]}x{size[1]} = {pixels}" if size[1] > 1 else str(pixels)
        raise TooManyPixels(
            f"{what}={path}: {shown} pixels is over the limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); "
            "refused as a possible decompression bomb, scale the image down first"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode; see open_image_as_viewed for the choices."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (PNG, TIFF); PIL's convert("L") clips at 255 instead of scaling, so mid-grey 32768
        # would become white. Mode "I" is treated as 16-bit too: that is how PIL has opened 16-bit PNGs.
        import numpy as np

        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "LAB":  # PIL's convert would copy the L, a, b numbers into R, G, B as they are
        raise ValueError("a CIELAB image; save it as RGB first")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white")
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


# --- writing outputs ----------------------------------------------------------------------------------------


def _umask_at_import() -> int:
    # os.umask can only be read by setting it; done once here, while importing, where no other thread of ours
    # is creating files, and restored at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status, thread-safe);
    elsewhere the umask synth was imported under."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return UMASK_AT_IMPORT


def temp_owner() -> str:
    """Who writes a temp file: pid@host, so a cleanup can tell a killed writer from a live one."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"
    return f"{os.getpid()}@{host}"


def remove_stale_temps(folder: Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete save_png temp files left in folder by a writer that was killed mid-write; returns what went.

    A temp file of this host is stale when its writer's pid is no longer running (and it has not been written
    to for DEAD_TEMP_SECONDS); one from another host (a shared folder) or from an older synth without the pid
    in the name only once it is older than max_age. Another live process's temp file is never deleted.
    """
    removed = []
    here = temp_owner().split("@", 1)[1]
    for file in folder.glob(f"{TEMP_PREFIX}*.png"):
        owner = re.fullmatch(rf"{re.escape(TEMP_PREFIX)}(\d+)@(.*)-[a-z0-9_]+\.png", file.name)
        try:
            age = time.time() - file.stat().st_mtime
            if owner is not None and owner.group(2) == here:
                if age < DEAD_TEMP_SECONDS or pid_alive(int(owner.group(1))):
                    continue
            elif age < max_age:
                continue
            file.unlink()
            removed.append(file)
        except FileNotFoundError:  # its writer or another cleanup got there first
            continue
    return removed


def pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True  # 0 would ask about our process group; our own pid: another thread of this process
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except (OSError, OverflowError):  # a pid out of range, an OS without kill: keep the file rather than guess
        return True
    return True


def save_png(image: Image.Image, folder: Path, stem: str, text: dict[str, str]) -> Path:
    """Write image as folder/stem.png (stem-1.png, ... if taken) with text chunks, atomically.

    The bytes go to a hidden temporary file first and are hard-linked into place, so a crash never leaves a
    truncated PNG and an existing file is never replaced. Temp files of writers killed mid-write are removed
    first, and the PNG gets the usual mode for new files (0666 less the umask), as open() would give it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{temp_owner()}-", suffix=".png")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        for attempt in range(10_000):
            path = folder / (f"{stem}.png" if attempt == 0 else f"{stem}-{attempt}.png")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"{folder}/{stem}*.png: no free file name")
    finally:
        os.unlink(tmp)


# --- reading synth PNGs back (replay=) ------------------------------------------------------------------------


def read_text(path: str | Path, what: str = "replay") -> dict[str, str]:
    """The PNG's text chunks, wherever they are in the file, without decoding its pixels.

    PIL's `image.text` decodes the whole image to reach text chunks stored after the image data; here PIL's
    own chunk reader (with its text-size limits) walks the chunks after the header instead, skipping the
    pixel data, and still insists on a complete file (up to IEND; text checksums verified). Raises ValueError
    (decompression bomb, see open_image_as_viewed) and OSError/SyntaxError for a broken file.
    """
    with open_within_limit(Path(path).expanduser(), what, path) as image:
        png = getattr(image, "png", None)
        if image.format != "PNG" or png is None or not image.tile:
            image.load()  # not a PNG (or a PIL without the chunk reader): the plain way
            return dict(getattr(image, "text", {}) or {})
        image.fp.seek(image.tile[0][2] - 8)  # back to the first image-data chunk, as PIL's verify() does
        png.queue = []  # an APNG may have queued that chunk already; it is read again from here
        while True:
            try:
                cid, pos, length = png.read()
            except struct.error:  # fewer than 8 bytes left where a chunk header should be
                raise OSError("truncated PNG file: it ends before its IEND chunk") from None
            if cid == b"IEND":
                break
            if cid in TEXT_CHUNKS:
                png.crc(cid, png.call(cid, pos, length))
            else:
                image.fp.seek(length + 4, os.SEEK_CUR)  # data and checksum of image data and other chunks
        return {key: str(value) for key, value in png.im_text.items()}


MAX_NODES = 10_000  # a synth config has a few hundred; YAML aliases could otherwise expand a small chunk enormously


def count_nodes(value, limit: int = MAX_NODES) -> int:
    """How many values `value` holds, counting shared (aliased) ones each time, stopping past limit."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return count


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG given as replay=, with a missing or unreadable file as one FileNotFoundError or
    ValueError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"replay={path}: no such file")
    try:
        return read_text(path)
    except TooManyPixels:
        raise
    except Exception as error:  # noqa: BLE001  (as in open_image_as_viewed: any decoder error means unreadable)
        raise ValueError(f"replay={path}: not a readable image ({type(error).__name__}: {error})") from None


def read_stored_config(path: str | Path, text: dict[str, str] | None = None) -> dict:
    """The `synth-config` chunk of a PNG as plain data: YAML without tags, a mapping; ValueError otherwise.
    text: the PNG's chunks if already read (read_png_text).

    Anyone can write that chunk, so it is parsed with yaml.safe_load (a python tag is an error, never an object)
    and nothing in it is resolved; synth.replay then checks it against synth's own config.
    """
    import yaml

    path = Path(path).expanduser()
    text = read_png_text(path) if text is None else text
    if CONFIG_KEY not in text:
        also = f" and no A1111 '{PARAMETERS_KEY}' text" if PARAMETERS_KEY not in text else ""
        raise ValueError(f"replay={path}: the image has no synth metadata (no '{CONFIG_KEY}' text chunk){also}")
    try:
        data = yaml.safe_load(text[CONFIG_KEY])
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        raise ValueError(f"replay={path}: its {CONFIG_KEY} chunk is not plain YAML ({problem})") from None
    except RecursionError:
        raise ValueError(f"replay={path}: its {CONFIG_KEY} chunk is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"replay={path}: its {CONFIG_KEY} chunk is a {type(data).__name__}, not a mapping of config keys")
    if count_nodes(data) > MAX_NODES:
        raise ValueError(f"replay={path}: its {CONFIG_KEY} chunk holds more than {MAX_NODES} values; not a synth config")
    return data


def read_config(path: str | Path) -> DictConfig:
    """The synth config stored in a PNG, as read_stored_config reads it, for looking at (tests, tools)."""
    return OmegaConf.create(read_stored_config(path))
