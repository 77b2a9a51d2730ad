"""Config helpers: OmegaConf resolvers, size parsing and the path checks the input checks (synth.checks) use.

Nothing here imports torch or diffusers, so a bad command line fails in well under a second.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from synth.families import FAMILIES, get_family

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MAX_SIDE = 16384  # beyond this even tiled sampling needs more than one GPU's host memory
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "fp16", "bf16", "fp32")
OFFLOADS = ("none", "model")  # model: DiffusionPipeline.enable_model_cpu_offload
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> str:
    """Where synth keeps built twins and caches: $SYNTH_CACHE_DIR, else ~/.cache/synth."""
    return str(Path(os.environ.get("SYNTH_CACHE_DIR", "~/.cache/synth")).expanduser())


if not OmegaConf.has_resolver("synth_cache"):
    OmegaConf.register_new_resolver("synth_cache", cache_dir)

_run_files: dict[tuple[str, str], str] = {}  # (run folder, job number) -> the subfolder this process claimed


def run_files_subdir(*, _root_: DictConfig) -> str:
    """hydra.output_subdir: where Hydra writes a run's config.yaml, hydra.yaml and overrides.yaml.

    Hydra always writes them to <run folder>/.hydra, so a second run into one folder replaced the first
    run's; here the first run gets .hydra and each later one the next free .hydra-1, .hydra-2, ... Hydra
    reads this key twice before writing, hence the memo; the folder is claimed with mkdir, so two runs
    started at once cannot pick the same name.
    """
    output_dir = OmegaConf.select(_root_, "hydra.runtime.output_dir", default=None, throw_on_missing=False)
    if not output_dir:  # not inside a job (--cfg, --help): nothing is written, nothing to claim
        return ".hydra"
    key = (str(output_dir), str(OmegaConf.select(_root_, "hydra.job.num", default="", throw_on_missing=False)))
    if key not in _run_files:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for number in range(100_000):
            name = ".hydra" if number == 0 else f".hydra-{number}"
            try:
                (Path(output_dir) / name).mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{output_dir}: no free .hydra-<n> folder name")
        _run_files[key] = name
    return _run_files[key]


if not OmegaConf.has_resolver("synth_run_files"):
    OmegaConf.register_new_resolver("synth_run_files", run_files_subdir)


def parse_size(size, native_size: int) -> tuple[int, int]:
    """Turn `size` (None, an int, "2048" or "1216x832") into (width, height)."""
    if size is None:
        return native_size, native_size
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"size={size!r}: give an int (2048) or 'WxH' (1216x832)")
    text = str(size).strip().lower()
    match = re.fullmatch(r"(-?\d+)(?:x(-?\d+))?", text)
    if match is None:
        raise ValueError(f"size={size!r}: give an int (2048) or 'WxH' (1216x832)")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) is not None else width
    return width, height


def check_size(width: int, height: int, family_name: str) -> None:
    step = get_family(family_name).size_step
    for side, value in (("width", width), ("height", height)):
        if value <= 0 or value > MAX_SIDE:
            raise ValueError(f"size: {side} {value} is out of range; allowed 1..{MAX_SIDE} in multiples of {step}")
        if value % step:
            raise ValueError(
                f"size: {side} {value} is not a multiple of {step} ({family_name} needs multiples of {step}); "
                f"try {value // step * step or step}"
            )


def is_single_file(path: str) -> bool:
    return path.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def check_model_path(model_cfg: DictConfig) -> None:
    """model.path must be a local diffusers folder, a local single-file checkpoint, or a hub id."""
    path = str(model_cfg.path)
    family = get_family(model_cfg.family)
    if model_cfg.get("twin") and not is_single_file(path):
        return  # built on first use by synth.twins
    local = Path(path).expanduser()
    if is_single_file(path):
        if not path.lower().endswith(".safetensors"):
            raise ValueError(
                f"model.path={path}: only .safetensors single-file checkpoints are loaded "
                "(.ckpt/.pt/.bin files can run arbitrary code when unpickled)"
            )
        if not family.single_file:
            raise ValueError(
                f"model.path={path}: {family.name} has no single-file format; "
                "single-file checkpoints are supported for "
                + _and(name for name, each in FAMILIES.items() if each.single_file)
            )
        if not local.is_file():
            raise FileNotFoundError(f"model.path={path}: no such file")
        config = model_cfg.get("single_file_config")
        if not config or is_single_file(str(config)):
            raise ValueError(f"model.single_file_config={config}: a single-file checkpoint (model.path={path}) takes "
                             "its components' configs, and what it lacks, from a diffusers folder or hub id of the "
                             "same model; set model.single_file_config to one")
        return
    if check_weights_source("model.path", path, "model_index.json", offline_message=None,  # see check_offline
                            folder_note=" (not a diffusers pipeline folder)", local_word="path"):
        check_no_pickles(path, local)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set: a hub id then loads only from the local hub cache."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "no", "")


def check_weights_source(where: str, path: str, marker: str, *, offline_message: str | None,
                         folder_note: str = "", folder_error: type = ValueError, local_word: str = "folder") -> bool:
    """The one hub/local/offline check of models, ControlNets, annotators and prompters: `path` is an existing
    local folder holding `marker`, or a hub id, which with HF_HUB_OFFLINE set must have `marker` in the hub cache
    (refused with `offline_message`; None skips that check). Returns whether the path is local."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / marker).is_file():
            raise folder_error(f"{where}={path}: folder has no {marker}{folder_note}")
        return True
    if not HUB_ID.match(path):
        raise ValueError(f"{where}={path}: neither an existing local {local_word} nor a hub id like 'owner/name'")
    if offline_message is not None and hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, marker), str):
            raise FileNotFoundError(offline_message)
    return False


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_no_pickles(path: str, folder: Path) -> None:
    """A diffusers folder whose component holds weights only as pickles is refused: synth loads folders with
    use_safetensors=True (synth.pipelines), so diffusers never unpickles them, and this says so before loading."""
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in component.iterdir() if p.is_file()]
        pickled = sorted(p.name for p in files if p.suffix.lower() in PICKLED)
        if pickled and not any(p.suffix.lower() == ".safetensors" for p in files):
            raise ValueError(
                f"model.path={path}: {component.name}/ holds only pickled weights ({pickled[0]}); synth loads "
                ".safetensors weights only (pickles can run arbitrary code when loaded): convert them to .safetensors"
            )


def check_finite(cfg: DictConfig, prefix: str = "") -> None:
    """Every float in the config is finite: nan or inf in any knob would end in a black image with exit 0."""
    from omegaconf import ListConfig

    keys = list(cfg.keys()) if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        if prefix == "" and key == "hydra":
            continue
        try:
            value = cfg[key]
        except Exception:  # noqa: BLE001 (an interpolation that cannot resolve here, e.g. ${hydra:...} in tests)
            continue
        name = f"{prefix}[{key}]" if isinstance(cfg, ListConfig) else f"{prefix}{'.' if prefix else ''}{key}"
        if isinstance(value, (DictConfig, ListConfig)):
            check_finite(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value}: must be a finite number (nan and inf are refused)")


def check_offline(model_cfg: DictConfig) -> None:
    """With HF_HUB_OFFLINE set, a hub id whose weights are not cached fails now, not mid-load."""
    path = str(model_cfg.path)
    if model_cfg.get("twin") or Path(path).expanduser().exists() or not HUB_ID.match(path):
        return
    check_weights_source("model.path", path, "model_index.json", offline_message=str(offline_error(path)))


def offline_error(path: str, key: str = "model.path") -> FileNotFoundError:
    if key.startswith("prompter."):
        twins = "prompter=" + ", ".join(stem for stem in group_options("prompter") if stem.startswith("tiny_"))
    else:
        twins = "model=" + ", ".join(twin_models())
    return FileNotFoundError(
        f"{key}={path}: weights are not available offline; download them first, point {key} "
        f"at a local folder or .safetensors file, or use an offline twin ({twins})"
    )


def hub_load(path: str, key: str, load):
    """load() for weights that may come from the Hugging Face hub: when `path` is not on this disk and loading
    fails with an OSError (no network, not cached, not found, gated), the run stops with offline_error's one
    line instead of the loaders' chained tracebacks. Errors loading a local path are the loaders' own."""
    try:
        return load()
    except OSError as error:
        if Path(path).expanduser().exists():
            raise
        raise offline_error(path, key) from error


def twin_models() -> list[str]:
    """The offline twin model configs (conf/model/tiny_*.yaml), registry order, variants after their family."""
    names = [stem for stem in group_options("model") if stem.startswith("tiny_")]
    order = list(FAMILIES)
    return sorted(names, key=lambda stem: (next((i for i, f in enumerate(order) if stem[5:].startswith(f)), len(order)),
                                           len(stem)))


def _and(names) -> str:
    names = list(names)
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def check_init_image(path: str) -> tuple[int, int]:
    """The init image must exist and decode completely; returns its (width, height) as a viewer shows it
    (after EXIF rotation: a portrait photo is portrait)."""
    from synth.images import open_image_as_viewed

    return open_image_as_viewed(path, "init_image").size


def scheduler_fits(scheduler_cfg, family) -> bool:
    """Whether a scheduler config fits the family: its `fits` list names the family's prediction kind."""
    return family.prediction in scheduler_cfg.fits


def scheduler_families(scheduler_cfg) -> list[str]:
    """The registered families a scheduler config fits."""
    from synth.families import FAMILIES

    return [name for name, family in FAMILIES.items() if scheduler_fits(scheduler_cfg, family)]


def fitting_schedulers(family_name: str) -> list[str]:
    family = get_family(family_name)
    return [file.stem for file in sorted((CONF_DIR / "scheduler").glob("*.yaml"))
            if scheduler_fits(OmegaConf.load(file), family)]


def group_options(group: str) -> list[str]:
    """The choices of a config group, from the files in conf/."""
    return sorted(file.stem for file in (CONF_DIR / group).glob("*.yaml"))
