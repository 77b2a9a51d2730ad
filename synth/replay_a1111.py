"""`replay=` of a PNG made by A1111 or Forge: its `parameters` text mapped onto synth's settings.

Such a PNG has no synth-config, only the text A1111 writes. It is untrusted, so it is read strictly
(synth.a1111.parse_parameters: a malformed text or field is refused in one line, nothing is evaluated), and
nothing in it chooses a class, file, folder or environment variable: a sampler name selects one of synth's
scheduler options by the A1111 name that option has, an upscaler one of synth's two, and numbers are numbers.
What maps goes onto the config the command line composed (the model is the command line's; every key the
command line gives wins):

    prompt (without <lora:...> tokens), Negative prompt   -> prompt, negative_prompt
    Steps, CFG scale, Seed                                 -> num_inference_steps, guidance_scale, seed
    Sampler (+ Schedule type; "DPM++ 2M Karras" of A1111
      before 1.9 too)                                      -> scheduler=<the option with that A1111 name>
    Size (x Hires upscale, or Hires resize)                -> size
    Denoising strength, Hires steps (with hires fields)    -> highres.stages=[{size, strength, steps}]
    Hires upscaler Latent* / Lanczos                       -> highres.upscale=latent / lanczos
    Denoising strength (no hires fields)                   -> denoise_strength, when init_image= is given
    <lora:name:weight>                                     -> lora.scale of the lora.path file named name
    Model hash, Lora hashes, TI hashes                     -> checked against the files the run uses

Everything else (another model's hash, LoRA tokens no lora.path file matches, Clip skip, VAE, extensions'
fields, ...) is listed in one log line, so the user sees at once what the replay does not reproduce. A1111's
noise comes from its own random generator, so even a fully mapped replay gives another image of the same
settings, not the same pixels.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from synth.a1111 import (
    Infotext,
    configured_scheduler,
    parse_parameters,
    resource_name,
    sampler_name,
)
from synth.cli_args import escape_interpolations
from synth.config import CONF_DIR, group_options

log = logging.getLogger(__name__)

INTEGER = (re.compile(r"-?\d{1,20}"), "an integer")
NUMBER = (re.compile(r"-?\d{1,9}(\.\d{1,16})?"), "a number")
SIZE = (re.compile(r"(\d{1,6})x(\d{1,6})"), "WIDTHxHEIGHT")
HASH = (re.compile(r"[0-9a-fA-F]{8,64}"), "a hex hash")
HIRES = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler")
READ = {"Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Seed", "Size", "Denoising strength", *HIRES, "Model hash",
        "Model", "Lora hashes", "TI hashes", "Hashes", "Clip skip", "Family", "Version"}
OWN_SCHEDULE = (None, "Automatic")  # A1111's "Automatic": the sampler's own sigmas
OLD_SCHEDULES = ("Karras", "Exponential")  # A1111 before 1.9 appended these to the sampler name
NETWORK = re.compile(r"<(lora|lyco|hypernet):([^<>]*)>", re.IGNORECASE)


def shown(value, limit: int = 60) -> str:
    """A value of the PNG as one short printable piece of the note line."""
    text = re.sub(r"\s+", " ", str(value))
    return text if len(text) <= limit else text[:limit] + "..."


class Mapping:
    """The synth settings an A1111 text maps to (values), and what it could not map (notes)."""

    def __init__(self, cfg: DictConfig, overridden: set[str], png: Path, info: Infotext):
        self.cfg, self.overridden, self.png, self.info = cfg, overridden, png, info
        self.values: dict = {}
        self.notes: list[str] = []
        self.first_pass: tuple[int, int] | None = None  # A1111's first-pass Size, when the text has a hires pass

    def is_overridden(self, key: str) -> bool:
        """Whether the command line set key: itself, or a section above it; a group choice (model=tiny_flux)
        picks a file and leaves its keys to the PNG (model.true_cfg_scale)."""
        return any(key == given or (key.startswith(given + ".") and not (CONF_DIR / given).is_dir())
                   for given in self.overridden)

    def set(self, key: str, value) -> None:
        if not self.is_overridden(key):
            self.values[key] = value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def field(self, key: str, rule=None):
        """The PNG's value of key (None if absent), checked against rule (pattern, kind): ValueError otherwise."""
        value = self.info.fields.get(key)
        if value is None or rule is None:
            return value
        pattern, kind = rule
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise ValueError(f"replay={self.png}: {key}={shown(value)!r} in its parameters text is not {kind}")
        return value


def hash_list(mapping: Mapping, key: str) -> dict[str, str]:
    """`Lora hashes` / `TI hashes`: "name: hash, name: hash" -> {name: hash}."""
    value = mapping.field(key)
    if value is None:
        return {}
    found = {}
    for item in value.split(",") if isinstance(value, str) else [""]:
        name, _, digest = (part.strip() for part in item.partition(":"))
        if not name or HASH[0].fullmatch(digest) is None:
            raise ValueError(f"replay={mapping.png}: {key}={shown(value)!r} in its parameters text is not "
                             "\"name: hash, ...\"")
        found[name] = digest.lower()
    return found


def scheduler_options(mapping: Mapping) -> list[tuple[str, str, str | None]]:
    """(option, A1111 sampler, schedule type) of every scheduler option that fits the run's family; options with a
    class first, then default (the family's own, when its scheduler config can be read here)."""
    from synth.families import get_family

    family = get_family(mapping.cfg.model.family)
    options = []
    for name in group_options("scheduler"):
        option = OmegaConf.load(CONF_DIR / "scheduler" / f"{name}.yaml")  # synth's own config files
        if family.prediction not in option.fits:
            continue
        if not option.get("cls"):
            model = mapping.cfg.model
            if model.get("twin") and not Path(str(model.path)).expanduser().exists():
                from synth.twins import (
                    ensure_model_twin,  # its scheduler config is part of the twin
                )

                ensure_model_twin(model)
        identity = configured_scheduler(option, mapping.cfg.model)
        if identity is not None:
            options.append((name, *sampler_name(*identity)))
    return sorted(options, key=lambda entry: entry[0] == "default")


def map_sampler(mapping: Mapping) -> None:
    sampler, schedule = mapping.field("Sampler"), mapping.field("Schedule type")
    if sampler is None or mapping.is_overridden("scheduler"):
        return
    if not isinstance(sampler, str) or (schedule is not None and not isinstance(schedule, str)):
        raise ValueError(f"replay={mapping.png}: Sampler={shown(sampler)!r} in its parameters text is not a name")
    if schedule is None and sampler.rsplit(" ", 1)[-1] in OLD_SCHEDULES:
        sampler, schedule = sampler.rsplit(" ", 1)
    wanted = None if schedule in OWN_SCHEDULE else schedule
    options = scheduler_options(mapping)
    exact = [name for name, a1111, own in options if (a1111, own) == (sampler, wanted)]
    if exact:
        mapping.set("scheduler", exact[0])
        return
    close = sorted((own is not None, name) for name, a1111, own in options if a1111 == sampler)
    if close:
        mapping.set("scheduler", close[0][1])
        mapping.note(f"Schedule type: {shown(schedule)} (ran scheduler={close[0][1]}: {sampler} with its own schedule)")
        return
    mapping.note(f"Sampler: {shown(sampler)}" + (f", Schedule type: {shown(schedule)}" if schedule else "")
                 + f" (no synth scheduler for {mapping.cfg.model.family}; ran scheduler={mapping.cfg.scheduler.name})")


def map_size_and_hires(mapping: Mapping) -> None:
    size = mapping.field("Size", SIZE)
    if size is None:
        return
    width, height = (int(side) for side in size.split("x"))
    strength = mapping.field("Denoising strength", NUMBER)
    if not any(key in mapping.info.fields for key in HIRES):
        mapping.set("size", f"{width}x{height}")
        if strength is not None and mapping.cfg.init_image is not None:
            mapping.set("denoise_strength", float(strength))
        elif strength is not None:
            mapping.note(f"Denoising strength: {strength} (an image-to-image setting: give init_image=... to use it)")
        return
    resize, upscale = mapping.field("Hires resize", SIZE), mapping.field("Hires upscale", NUMBER)
    steps = mapping.field("Hires steps", INTEGER)
    if resize is not None and "0" not in resize.split("x"):
        final = tuple(int(side) for side in resize.split("x"))
    elif upscale is not None:
        final = (int(width * float(upscale)), int(height * float(upscale)))  # as A1111 computes the hires size
    else:
        mapping.set("size", f"{width}x{height}")
        mapping.note("Hires steps/upscaler without Hires upscale or Hires resize (no hires pass)")
        return
    mapping.set("size", f"{final[0]}x{final[1]}")
    highres = mapping.cfg.get("highres")
    if highres is None or highres.get("name", "none") == "none":
        mapping.note(f"the hires pass ({width}x{height} -> {final[0]}x{final[1]}; highres=none: generated directly)")
        return
    if strength is not None:
        stage = {"size": f"{final[0]}x{final[1]}", "strength": float(strength),
                 "steps": int(steps) if steps is not None and int(steps) > 0 else None}
        mapping.set("highres.stages", [stage])
    upscaler = mapping.field("Hires upscaler")
    if isinstance(upscaler, str) and upscaler.startswith("Latent"):
        mapping.set("highres.upscale", "latent")
        if upscaler != "Latent":
            mapping.note(f"Hires upscaler: {shown(upscaler)} (ran synth's bilinear latent upscale)")
    elif upscaler is not None:
        mapping.set("highres.upscale", "lanczos")
        if upscaler != "Lanczos":
            mapping.note(f"Hires upscaler: {shown(upscaler)} (ran Lanczos)")
    mapping.first_pass = (width, height)


def map_loras(mapping: Mapping, prompt: str) -> str:
    """The prompt without extra-network tokens; each <lora:name:weight> sets the scale of the lora.path file of
    that name (kohya/A1111 name a LoRA by its file stem)."""
    from synth import hashes
    from synth.loras import lora_entries

    entries = lora_entries(mapping.cfg.get("lora"))
    by_name = {resource_name(Path(path).stem): index for index, (path, _) in enumerate(entries)}
    scales = [scale for _, scale in entries]
    listed = hash_list(mapping, "Lora hashes")
    matched = False
    for kind, body in NETWORK.findall(prompt):
        name, *arguments = body.split(":")
        if kind.lower() == "hypernet":
            mapping.note(f"<hypernet:{shown(body)}> (synth has no hypernetworks)")
            continue
        positional = [a for a in arguments if "=" not in a]
        named = dict(a.split("=", 1) for a in arguments if "=" in a)
        weights = {"te": positional[0] if positional else named.get("te", "1")}
        weights["unet"] = positional[1] if len(positional) > 1 else named.get("unet", weights["te"])
        for which, text in weights.items():
            if NUMBER[0].fullmatch(text.strip()) is None:
                raise ValueError(f"replay={mapping.png}: <{kind}:{shown(body)}> in its prompt: {which} weight "
                                 f"{shown(text)!r} is not a number")
        if name not in by_name:
            mapping.note(f"<{kind}:{shown(body)}> (no lora.path file named {shown(name)})")
            continue
        index = by_name[name]
        scales[index], matched = float(weights["unet"]), True
        if float(weights["te"]) != float(weights["unet"]) or len(positional) > 2 or set(named) - {"te", "unet"}:
            mapping.note(f"<{kind}:{shown(body)}> (synth has one scale per LoRA: ran {scales[index]:g})")
        if name in listed and not hashes.lora_hash(entries[index][0]).startswith(listed[name][:12]):
            mapping.note(f"Lora hashes: {shown(name)}: {listed[name]} (lora.path {Path(entries[index][0]).name} "
                         f"has {hashes.lora_hash(entries[index][0])})")
    if matched:
        mapping.set("lora.scale", scales)
    return NETWORK.sub("", prompt).strip()


def map_resources(mapping: Mapping) -> None:
    """Model hash (or Hashes' model) and TI hashes, checked against what this run uses."""
    from synth import hashes
    from synth.textual_inversion import embedding_paths

    hashed = mapping.field("Hashes")
    if hashed is not None and not (isinstance(hashed, dict) and all(isinstance(v, str) for v in hashed.values())):
        raise ValueError(f"replay={mapping.png}: Hashes={shown(hashed)!r} in its parameters text is not a JSON "
                         "object of hashes")
    theirs = mapping.field("Model hash", HASH) or (hashed or {}).get("model")
    name = mapping.field("Model")
    model = mapping.cfg.model
    if theirs is not None:
        if HASH[0].fullmatch(str(theirs)) is None:
            raise ValueError(f"replay={mapping.png}: Hashes' model={shown(theirs)!r} is not a hex hash")
        ours = hashes.model_hash(model)
        if ours is None or not (ours.startswith(theirs.lower()) or theirs.lower().startswith(ours)):
            has = f"its hash is {ours}" if ours else "its weights are not on this machine to check"
            mapping.note(f"Model: {shown(name)}, Model hash: {theirs} (ran model.path={model.path}: {has})")
    elif name is not None and str(name) != hashes.model_name(model):
        mapping.note(f"Model: {shown(name)} (ran model.path={model.path})")
    files = {path.stem: path for path in embedding_paths(mapping.cfg.get("textual_inversion"))}
    for keyword, digest in hash_list(mapping, "TI hashes").items():
        if keyword not in files:
            mapping.note(f"TI hashes: {shown(keyword)} (give textual_inversion=<its file> to use the embedding)")
        elif not hashes.embedding_hash(files[keyword]).startswith(digest[:12]):
            mapping.note(f"TI hashes: {shown(keyword)}: {digest} ({files[keyword].name} has "
                         f"{hashes.embedding_hash(files[keyword])})")


def map_text(mapping: Mapping) -> None:
    """Every field of the PNG onto mapping (values and notes)."""
    info = mapping.info
    mapping.set("prompt", escape_interpolations(map_loras(mapping, info.prompt)))
    mapping.set("negative_prompt", escape_interpolations(info.negative_prompt))
    from synth.families import get_family

    fields = get_family(mapping.cfg.model.family).a1111_guidance_fields
    guidance = [(name, key, NUMBER, float) for name, key in fields.items()]
    for name in ("CFG scale", "Distilled CFG Scale"):
        if name not in fields and mapping.field(name) is not None:
            mapping.note(f"{name}: {shown(mapping.field(name))} ({mapping.cfg.model.family} has no such guidance)")
    for key, target, rule, convert in (("Steps", "num_inference_steps", INTEGER, int), *guidance,
                                       ("Seed", "seed", INTEGER, int)):
        value = mapping.field(key, rule)
        if value is not None:
            mapping.set(target, convert(value))
    map_sampler(mapping)
    map_size_and_hires(mapping)
    map_resources(mapping)
    clip_skip = mapping.field("Clip skip", INTEGER)
    if clip_skip is not None and int(clip_skip) != 1:
        mapping.note(f"Clip skip: {clip_skip} (synth has no clip skip)")
    family = mapping.field("Family")
    if family is not None and str(family) != mapping.cfg.model.family:
        mapping.note(f"Family: {shown(family)} (ran {mapping.cfg.model.family})")
    for key, value in info.fields.items():
        if key not in READ:
            mapping.note(f"{shown(key, 40)}: {shown(value)}")
    if info.extra_lines:
        mapping.note(f"{info.extra_lines} line(s) after the settings line")


def a1111_replay_config(cfg: DictConfig, overridden: set[str], png: Path, text: str) -> DictConfig:
    """cfg (the command line's config) with the settings of an A1111 `parameters` text that the command line
    does not give; logs one line saying what was not mapped. ValueError for a malformed text."""
    try:
        info = parse_parameters(text)
    except ValueError as error:
        if str(error).startswith("replay="):
            raise
        raise ValueError(f"replay={png}: {error}") from None
    mapping = Mapping(cfg, overridden, png, info)

    # 1. Map the text onto synth's keys.
    map_text(mapping)

    # 2. Apply them over the command line's config.
    result = cfg.copy()
    with open_dict(result):
        for key, value in mapping.values.items():
            if key == "scheduler":  # a group choice: that option's file, as Hydra would compose it
                result.scheduler = OmegaConf.load(CONF_DIR / "scheduler" / f"{value}.yaml")
            else:
                OmegaConf.update(result, key, value, merge=False, force_add=True)
        result.output_dir = cfg.output_dir
        result.replay = None

    # 3. A hires pass: synth's base stage has the family's native area, A1111's first pass the Size it wrote.
    if mapping.first_pass is not None and mapping.values.get("size") is not None:
        from synth.config import parse_size
        from synth.stages import plan_stages

        width, height = parse_size(result.size, result.model.native_size)
        steps = result.num_inference_steps or result.model.num_inference_steps
        base = plan_stages(result.highres, result.model.family, result.model.native_size, width, height, steps)[0]
        if (base.width, base.height) != mapping.first_pass:
            mapping.note(f"Size: {mapping.first_pass[0]}x{mapping.first_pass[1]} first pass (synth's base stage at the "
                         f"native area is {base.width}x{base.height})")

    # 4. One line: what this replay does not reproduce.
    where = f"replay={png}: an A1111 PNG (no synth-config)"
    if mapping.notes:
        log.warning("%s; not mapped: %s", where, "; ".join(mapping.notes))
    else:
        log.info("%s; every setting mapped", where)
    return result
