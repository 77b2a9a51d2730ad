"""Content hashes of weight files in the forms A1111 and civitai use, cached so that a large file is read once.

- **Model hash** (A1111's "AutoV2"): the first 10 hex digits of the SHA-256 of a single-file checkpoint.
- **Folder identity** (synth's, for a diffusers folder or hub snapshot, which A1111 and civitai have no hash for):
  the first 10 hex digits of the SHA-256 of the text with one line `<component>/<file> <sha256 of file>` per weight
  file diffusers loads (the `.safetensors` files of each component named in model_index.json, of model.variant if
  given), in sorted order. Weights only: editing a config or tokenizer file does not change it.
- **LoRA hash** (A1111's `Lora hashes`, civitai's "AutoV3"): the first 12 hex digits of the SHA-256 of a
  .safetensors file's bytes after its header (kohya's "addnet hash"), so editing a LoRA's metadata keeps its hash.
- **Embedding hash** (A1111's `TI hashes`): the first 12 hex digits of the SHA-256 of the whole file.

Every file hash is cached in `<synth cache dir>/file-hashes.json`, keyed by the file's resolved path, size and
modification time (ns): a 10 GB model is hashed once, and a file changed in place is hashed again. The cache is
replaced atomically (written beside it, then renamed), so a crash never leaves half a file; two processes writing
at once can at worst drop one's new entries, which are then computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_FILE = "file-hashes.json"
CHUNK = 8 * 1024 * 1024  # bytes read at a time: large enough for full-speed hashing, small enough for any machine
HEX64 = re.compile(r"[0-9a-f]{64}")
KINDS = ("sha256", "tensor_sha256")  # whole file; tensor data after a .safetensors header


def cache_path() -> Path:
    from synth.config import cache_dir

    return Path(cache_dir()) / CACHE_FILE


def _load_cache() -> dict:
    """The cached entries, {} when there is no cache or it is unreadable (it is only ever a shortcut)."""
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(key: str, entry: dict) -> None:
    """Set one entry of the cache file, atomically (temp file in the same folder, then os.replace)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_cache()  # re-read: another process may have added entries since
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CACHE_FILE}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as error:  # a read-only cache folder costs a re-hash next time, never the run
        log.debug("file hash cache not written: %s", error)


def _digest(path: Path, skip_header: bool) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        if skip_header:
            raw = file.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a .safetensors file (shorter than its 8-byte header length)")
            file.seek(8 + struct.unpack("<Q", raw)[0])
        for chunk in iter(lambda: file.read(CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _cached_digest(path: str | Path, kind: str) -> str:
    """The SHA-256 hex digest of kind "sha256" (the whole file) or "tensor_sha256" (after the safetensors header)."""
    file = Path(path).expanduser().resolve()
    stat = file.stat()
    key = str(file)
    entry = _load_cache().get(key)
    if (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get(kind), str) and HEX64.fullmatch(entry[kind])):
        return entry[kind]
    if stat.st_size > 1 << 30:
        log.info("hashing %s (%.1f GB) for the PNG metadata; cached in %s", file.name, stat.st_size / 1e9, cache_path())
    digest = _digest(file, skip_header=kind == "tensor_sha256")
    same_file = isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
    other = {k: v for k, v in entry.items() if k in KINDS and k != kind} if same_file else {}  # the other kind, still valid
    _store(key, {**other, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, kind: digest})
    return digest


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of the whole file, cached by (path, size, mtime_ns)."""
    return _cached_digest(path, "sha256")


def tensor_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a .safetensors file's tensor data: every byte after its header (kohya's addnet hash)."""
    return _cached_digest(path, "tensor_sha256")


def lora_hash(path: str | Path) -> str:
    """A1111's `Lora hashes` entry for a .safetensors LoRA (civitai's AutoV3)."""
    return tensor_sha256(path)[:12]


def embedding_hash(path: str | Path) -> str:
    """A1111's `TI hashes` entry for an embedding file."""
    return file_sha256(path)[:12]


# --- the model ------------------------------------------------------------------------------------------------


def model_folder(model_cfg) -> Path | None:
    """The local folder of a diffusers model: model.path itself, or a hub id's snapshot in the local hub cache
    (None when the weights are not on this machine)."""
    path = str(model_cfg.path)
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        return None
    from synth.config import HUB_ID

    if not HUB_ID.match(path):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def _variant_of(name: str) -> str | None:
    """diffusers' variant in a weight file name: `x.fp16.safetensors`, `x.fp16-00001-of-00002.safetensors` -> fp16."""
    parts = name.removesuffix(".safetensors").split(".")
    return re.sub(r"-\d+-of-\d+$", "", parts[-1]) if len(parts) > 1 else None


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The .safetensors files diffusers loads from a pipeline folder: each component's (named in
    model_index.json), of `variant` where a component has them, else its plain ones."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    files = []
    for component, entry in sorted(index.items() if isinstance(index, dict) else []):
        if component.startswith("_") or not (isinstance(entry, list) and all(entry)):
            continue  # "_class_name" and components stored as null
        directory = folder / component
        if not directory.is_dir():
            continue
        candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
        chosen = [p for p in candidates if variant is not None and _variant_of(p.name) == variant]
        files += chosen or [p for p in candidates if _variant_of(p.name) is None]
    return files


def folder_identity(folder: Path, variant: str | None) -> str | None:
    """synth's identity of a diffusers folder (see the module docstring), or None if it holds no weights."""
    files = weight_files(folder, variant)
    if not files:
        return None
    lines = "".join(f"{file.relative_to(folder).as_posix()} {file_sha256(file)}\n" for file in files)
    return hashlib.sha256(lines.encode()).hexdigest()[:10]


def model_hash(model_cfg) -> str | None:
    """The `Model hash` of a model config: AutoV2 of a single file, the folder identity of a diffusers folder or
    cached hub snapshot; None where the weights are not on this machine."""
    from synth.config import is_single_file

    path = str(model_cfg.path)
    if is_single_file(path):
        file = Path(path).expanduser()
        return file_sha256(file)[:10] if file.is_file() else None
    folder = model_folder(model_cfg)
    return folder_identity(folder, model_cfg.get("variant")) if folder is not None else None


def model_name(model_cfg) -> str:
    """A1111's `Model` field: a checkpoint's file stem, a folder's name, a hub id as it is."""
    from synth.config import is_single_file

    path = str(model_cfg.path)
    if is_single_file(path):
        return Path(path).stem
    local = Path(path).expanduser()
    return local.name if local.exists() else path
