"""What the web UI asks of synth, without Gradio: a page's settings -> an infer config -> synth.infer.infer.

Every image the UI makes goes through the same function as `python infer.py` (the same checks, pipeline
cache, PNG provenance and file names), into one sub-folder of the run folder per request, so that
`python infer.py replay=<png>` regenerates it exactly. A sketch is written to <run>/inputs/ first and given as
init_image, as a user would on the command line. The per-request configs are infer.yaml's, composed with the
ui.py command line's own overrides (device=, dtype=, ...) and the group choices the page makes.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
UI_GROUPS = ("model", "scheduler", "prompter", "lora")  # the groups the page chooses; the rest are the command line's


def check_ui(ui: DictConfig) -> tuple[str, str] | None:
    """Refuse an unsafe or impossible ui section in one line; returns the (user, password) of ui.auth, or None."""
    auth = None
    if ui.auth is not None:
        user, colon, password = str(ui.auth).partition(":")
        if not colon or not user or not password:
            raise ValueError(f"ui.auth={ui.auth}: write user:password")
        auth = (user, password)
    if str(ui.host) not in LOCAL_HOSTS and auth is None:
        raise ValueError(f"ui.host={ui.host} serves the page to other machines; give ui.auth=user:password too "
                         f"(or keep ui.host=127.0.0.1)")
    if not isinstance(ui.port, int) or isinstance(ui.port, bool) or not 0 <= ui.port < 65536:
        raise ValueError(f"ui.port={ui.port}: must be an integer in [0, 65535] (0 = any free port)")
    if isinstance(ui.max_upload_mb, bool) or not isinstance(ui.max_upload_mb, (int, float)) or not ui.max_upload_mb > 0:
        raise ValueError(f"ui.max_upload_mb={ui.max_upload_mb}: must be a number > 0")
    if ui.live not in ("auto", True, False):
        raise ValueError(f"ui.live={ui.live}: choose auto, true or false")
    for key in ("lora_dir", "embeddings_dir"):
        if ui.get(key) is not None and not Path(str(ui[key])).expanduser().is_dir():
            raise FileNotFoundError(f"ui.{key}={ui[key]}: no such folder")
    return auth


def check_accel_on_device(cfg: DictConfig) -> None:
    """synth.accel.check_accel on the device and dtype the ui config resolves to: accel options this machine
    cannot run are refused when ui.py starts, not at the first request."""
    from synth import pipelines
    from synth.accel import check_accel

    device = pipelines.resolve_device(cfg.device)
    check_accel(cfg, device, pipelines.resolve_dtype(cfg.dtype, device, cfg.model))


def command_line_overrides(overrides: list[str]) -> list[str]:
    """The ui.py overrides an infer config takes: not ui.*, not hydra.*, not the groups the page chooses."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = []
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = override.key_or_group
        if key.split(".")[0] in ("ui", "hydra") or key in UI_GROUPS:
            continue
        kept.append(text)
    return kept


@dataclass
class Settings:
    """One request from the page. None = the config's (the family's) default."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    num_images: int = 1
    size: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    denoise_strength: float = 0.5
    model: str | None = None
    scheduler: str | None = None
    prompter: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)  # (path, scale) of each LoRA that is on
    textual_inversion: list[str] = field(default_factory=list)  # embedding files chosen, after the command line's


class Generator:
    """The run's one generate function for every tab: a lock keeps one request on the device at a time."""

    def __init__(self, base: DictConfig, overrides: list[str], run_dir: Path, choices: dict[str, str]):
        self.base = base  # the ui.py config, for its ui section and starting values
        self.overrides = command_line_overrides(overrides)
        self.run_dir = Path(run_dir)
        self.choices = dict(choices)  # group -> option ui.py started with (hydra.runtime.choices)
        self.lock = threading.RLock()  # one GPU: requests from every tab run one after another (re-entrant: a
        # live request checks it is still the newest and generates under one hold)
        self._numbers = itertools.count(1)
        self._number_lock = threading.Lock()
        self._compose_lock = threading.Lock()
        self._composed: dict[tuple, DictConfig] = {}
        self._newest: dict[str, int] = {}  # session -> its newest live request (newest-request-wins)
        self._cancels: dict[str, threading.Event] = {}  # session -> its running request's Cancel (step_hooks)
        self.claimed = 0  # live requests seen (tests wait on it)

    # --- configs ---------------------------------------------------------------------------------------------

    def compose(self, settings: Settings) -> DictConfig:
        """infer.yaml with the command line's overrides and the page's group choices (cached per choice)."""
        from synth.replay import compose

        groups = {group: self.choices.get(group) for group in UI_GROUPS}
        groups.update({k: v for k, v in (("model", settings.model), ("scheduler", settings.scheduler),
                                         ("prompter", settings.prompter)) if v})
        if settings.loras:
            groups["lora"] = "default"
        key = (tuple(sorted((k, v) for k, v in groups.items() if v)), tuple(settings.loras))
        if key not in self._composed:
            overrides = [f"{group}={option}" for group, option in groups.items() if option]
            if settings.loras:
                overrides += [f"lora.path=[{','.join(repr(path) for path, _ in settings.loras)}]",
                              f"lora.scale=[{','.join(str(float(scale)) for _, scale in settings.loras)}]"]
            with self._compose_lock:  # Hydra's global state is not made for threads
                self._composed[key] = compose([*self.overrides, *overrides])
        return self._composed[key]

    def config(self, settings: Settings, init_image: Path | None, out_dir: Path) -> DictConfig:
        from synth.cli_args import escape_interpolations

        cfg = self.compose(settings).copy()
        with open_dict(cfg):
            cfg.prompt = escape_interpolations(settings.prompt)  # text as typed: `${` stays literal
            cfg.negative_prompt = escape_interpolations(settings.negative_prompt)
            cfg.seed = int(settings.seed)
            cfg.num_images = int(settings.num_images)
            cfg.size = settings.size or None
            cfg.num_inference_steps = settings.num_inference_steps
            cfg.guidance_scale = settings.guidance_scale
            cfg.denoise_strength = float(settings.denoise_strength)
            cfg.init_image = str(init_image) if init_image is not None else None
            cfg.replay = None
            given = cfg.get("textual_inversion") or []
            given = [given] if isinstance(given, str) else [str(path) for path in given]  # the command line's
            cfg.textual_inversion = [*given, *(path for path in settings.textual_inversion if path not in given)]
            cfg.output_dir = str(out_dir)
        return cfg

    # --- requests --------------------------------------------------------------------------------------------

    def next_number(self) -> int:
        with self._number_lock:
            return next(self._numbers)

    def claim_newest(self, session: str) -> int:
        """Mark a live request as its session's newest; returns its number for is_newest."""
        number = self.next_number()
        with self._number_lock:
            self._newest[session] = number
            self.claimed += 1
        return number

    def is_newest(self, session: str, number: int) -> bool:
        with self._number_lock:
            return self._newest.get(session) == number

    def pending(self, session: str) -> int | None:
        with self._number_lock:
            return self._newest.get(session)

    def write_sketch(self, image, number: int, width: int, height: int) -> Path:
        """The sketch as an RGB PNG of the request's size in <run>/inputs/: the init_image its PNG names."""
        from PIL import Image

        from synth.images import save_png, to_rgb

        image = to_rgb(image)
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        return save_png(image, self.run_dir / "inputs", f"{number:04d}", {})

    def cancel(self, session: str) -> bool:
        """Cancel the session's request: it stops at the end of the step it runs (or before its first one, if it
        waits for the device); the PNGs it wrote before stay, the one it was making is never written."""
        with self._number_lock:
            event = self._cancels.get(session)
        if event is None:
            return False
        event.set()
        return True

    def generate(self, settings: Settings, sketch=None, number: int | None = None, progress=None,
                 session: str | None = None) -> list[Path]:
        """Images of one request (written as infer.py writes them); ValueError for a bad setting, as infer.py;
        synth.step_hooks.Cancelled when `cancel(session)` stopped it. progress(label, done, total) hears each
        denoising step with its stage ("stage 2/3: 1024x1024")."""
        from synth.checks import check_inputs
        from synth.infer import infer
        from synth.step_hooks import observe

        cancel = threading.Event()  # a new request of the session: an earlier Cancel does not stop this one
        if session is not None:
            with self._number_lock:
                self._cancels[session] = cancel
        number = number if number is not None else self.next_number()
        out_dir = self.run_dir / f"{number:04d}"
        cfg = self.config(settings, None, out_dir)
        init = None
        if sketch is not None:
            width, height = check_inputs(cfg)  # the text-to-image size: the sketch is drawn for it
            init = self.write_sketch(sketch, number, width, height)
            cfg = self.config(settings, init, out_dir)
        with self.lock, observe(cancel, progress):
            return infer(cfg)

    def restore(self, png: str) -> DictConfig:
        """The settings of a synth or A1111 PNG (synth.replay), as the infer config infer.py replay= would run."""
        from synth.replay import replay_config

        cfg = self.compose(Settings()).copy()
        with open_dict(cfg):
            cfg.replay = str(png)
            cfg.output_dir = str(self.run_dir)
        with self._compose_lock:
            return replay_config(cfg, [])

    def model_option(self, cfg: DictConfig) -> str | None:
        """The conf/model option whose config is cfg.model (the one a restored PNG came from), or None."""
        from synth.replay import compose, model_family_options

        wanted = OmegaConf.to_container(cfg.model, resolve=True)
        options = [option for option, family in model_family_options().items() if family == cfg.model.family]
        for option in sorted(options, key=lambda o: o != self.choices.get("model")):
            with self._compose_lock:
                composed = compose([f"model={option}"])
            if OmegaConf.to_container(composed.model, resolve=True) == wanted:
                return option
        return None


def is_blank(image) -> bool:
    """A sketch pad with nothing on it (transparent or white everywhere): text-to-image, not a white init image."""
    import numpy as np

    if image is None:
        return True
    pixels = np.asarray(image.convert("RGBA"))
    drawn = pixels[..., 3] > 0
    return not drawn.any() or bool((pixels[drawn][:, :3] == 255).all())
