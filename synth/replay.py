"""`replay=image.png`: the config stored in a synth PNG, with the command line's other overrides on top.

A PNG is untrusted: anyone can write its `synth-config` chunk. So the stored YAML is parsed as plain data
(yaml.safe_load: no tags, no Python objects), nothing in it is ever resolved (`${...}` stays text), and it is
checked against synth's own config for the same group choices (model, scheduler, highres, ...), composed here
from conf/ by Hydra:

- only keys that config has are taken (unknown keys are refused);
- the plain values a user types (prompt, seed, size, steps, guidance, strengths, LoRA scales, ...) are taken
  when they have the right type (PLAIN below); check_inputs then checks them like any command-line value;
- every other value (model and twin paths, class names, scheduler kwargs, prompter models and templates, file
  paths such as init_image, lora.path, textual_inversion) must equal what synth's config says, or the key must
  be given again on the command line; otherwise the replay is refused in one line naming the key;
- output_dir, logger and hydra settings always come from the current run.

A PNG made by A1111 or Forge has only a `parameters` text; synth.replay_a1111 maps what it can of that text
onto the config the command line composes and says in one line what it could not map.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from synth.cli_args import escape_all_interpolations
from synth.config import CONF_DIR, group_options
from synth.images import (
    CONFIG_KEY,
    PARAMETERS_KEY,
    count_nodes,
    read_png_text,
    read_stored_config,
)

GROUPS = ("model", "scheduler", "highres", "controlnet", "prompter", "lora", "accel")  # groups whose choice the PNG records
CURRENT_RUN = ("output_dir", "replay", "logger", "hydra")  # always the current run's, whatever the PNG says


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _word(value) -> bool:  # a choice such as auto, fp16, cpu, lanczos: checked against its options by check_inputs
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value) is not None


def _size(value) -> bool:
    return value is None or _integer(value) or (isinstance(value, str) and re.fullmatch(r"\d{1,6}(x\d{1,6})?", value) is not None)


def _stages(value) -> bool:
    return value is None or (isinstance(value, list) and len(value) <= 16 and all(
        isinstance(stage, dict) and set(stage) <= {"size", "strength", "steps"} and _size(stage.get("size"))
        and _number(stage.get("strength", 0.5)) and (stage.get("steps") is None or _integer(stage["steps"]))
        for stage in value))


def _optional(rule):
    return lambda value: value is None or rule(value)


def _either(*rules):
    return lambda value: any(rule(value) for rule in rules)


def _list_of(rule):
    return lambda value: isinstance(value, list) and len(value) <= 64 and all(rule(item) for item in value)


TEXT = "text"  # free text: taken verbatim, `${` kept literal
RECORD = "record"  # provenance written by synth (prompter.processed_by): plain data, never used to generate
NUMBER, INTEGER = (_number, "a number"), (_integer, "an integer")
# Keys a PNG may set to another value than synth's own config, with the type each must have.
PLAIN = {
    "prompt": (lambda v: isinstance(v, str), TEXT),
    "negative_prompt": (lambda v: v is None or isinstance(v, str), TEXT),
    "seed": INTEGER,
    "num_images": INTEGER,
    "size": (_size, "an integer or 'WxH'"),
    "num_inference_steps": (_optional(_integer), "an integer or null"),
    "guidance_scale": (_optional(_number), "a number or null"),
    "denoise_strength": NUMBER,
    "device": (_word, "a device name"),
    "dtype": (_word, "a dtype name"),
    "offload": (_word, "an offload mode"),
    "model.num_inference_steps": INTEGER,
    "model.guidance_scale": NUMBER,
    "model.native_size": INTEGER,
    "model.t5": (lambda v: isinstance(v, bool), "true or false"),
    "model.max_sequence_length": INTEGER,
    "model.variant": (_optional(_word), "a weight variant name such as fp16, or null"),
    "model.cuda_dtype": (_word, "a dtype name"),
    "highres.upscale": (_word, "an upscaler name"),
    "highres.stages": (_stages, "null or a list of {size, strength, steps}"),
    "highres.strengths.*": (_list_of(_number), "a list of numbers"),
    "highres.stage_steps": (_optional(_integer), "an integer or null"),
    "highres.save_intermediate": (lambda v: isinstance(v, bool), "true or false"),
    "highres.tiled": (_either(lambda v: isinstance(v, bool), _word), "auto, true or false"),
    "highres.tile_size": (_optional(_integer), "an integer or null"),
    "highres.tile_overlap": (_optional(_integer), "an integer or null"),
    "highres.tile_batch_size": INTEGER,
    "highres.vae_tiled": (_either(lambda v: isinstance(v, bool), _word), "auto or false"),
    "highres.vae_tile_size": (_optional(_integer), "an integer or null"),
    "highres.tile_device": (_word, "auto or cpu"),
    "controlnet.variant": (_optional(_word), "a weight variant name or null"),
    "controlnet.conditioning_scale": NUMBER,
    "controlnet.guidance_start": NUMBER,
    "controlnet.guidance_end": NUMBER,
    "controlnet.coarse": (lambda v: isinstance(v, bool), "true or false"),
    "controlnet.detect_resolution": INTEGER,
    "prompter.translator.source_script": (_word, "a script name"),
    "prompter.translator.num_beams": INTEGER,
    "prompter.translator.max_new_tokens": INTEGER,
    "prompter.refiner.max_new_tokens": INTEGER,
    "prompter.refiner.temperature": NUMBER,
    "prompter.refiner.top_k": NUMBER,
    "prompter.refiner.top_p": NUMBER,
    "prompter.refiner.repetition_penalty": NUMBER,
    "prompter.original_prompt": (lambda v: isinstance(v, str), TEXT),  # written by synth.prompter.record_prompt
    "prompter.processed_by": (lambda v: isinstance(v, dict), RECORD),
    "lora.scale": (_either(_number, _list_of(_number)), "a number or a list of numbers"),
    "lora.rank": INTEGER,
    "lora.alpha": NUMBER,
    "lora.dropout": NUMBER,
    "lora.init": (_either(lambda v: isinstance(v, bool), _word), "true, false or an init name"),
    # the accel group's options (synth.accel checks their values and the machine before anything loads)
    "accel.compile": (_word, "a compile mode name"),
    "accel.compile_mode": (_word, "a torch.compile mode name"),
    "accel.compile_backend": (_word, "a torch.compile backend name"),
    "accel.compile_dynamic": (lambda v: isinstance(v, bool), "true or false"),
    "accel.attention": (_word, "an attention backend name"),
    "accel.fuse_qkv": (lambda v: isinstance(v, bool), "true or false"),
    "accel.channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "accel.quantize": (_word, "a quantisation name"),
    "accel.vae": (_word, "none or slicing"),
    "accel.cache": (_word, "a cache name"),
    "accel.cache_threshold": NUMBER,
    "accel.lora_hotswap": (lambda v: isinstance(v, bool), "true or false"),
    "accel.lora_hotswap_rank": INTEGER,
}
RECORD_KEYS = ("prompter.original_prompt", "prompter.processed_by")  # not in synth's config, but synth writes them


def same(a, b) -> bool:
    """Equal values of equal kinds: 1 and True differ, 1 and 1.0 do not (YAML writes both floats and ints)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _number(a) and _number(b):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def compose(overrides: list[str]) -> DictConfig:
    """synth's own infer config for these group choices, composed from conf/ (inside a Hydra app or outside)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="infer", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="infer", overrides=overrides)


def model_family_options() -> dict[str, str]:
    """model option -> its family, from conf/model (a file names its family or inherits it from its defaults)."""

    def family_of(stem: str) -> str | None:
        data = OmegaConf.load(CONF_DIR / "model" / f"{stem}.yaml")
        if "family" in data:
            return data.family
        parents = [entry for entry in data.get("defaults", []) if isinstance(entry, str) and entry != "_self_"]
        return family_of(parents[0]) if parents else None

    return {stem: family_of(stem) for stem in group_options("model")}


class Validator:
    """Checks a stored config against synth's own config and collects the values it may take from it."""

    def __init__(self, png: Path, overridden: set[str]):
        self.png, self.overridden, self.accepted = png, overridden, {}

    def is_overridden(self, name: str) -> bool:
        return any(name == key or name.startswith(key + ".") for key in self.overridden)

    def refuse(self, message: str):
        raise ValueError(f"replay={self.png}: {message}")

    def differences(self, stored: dict, trusted: dict, prefix: str = "") -> int:
        """How many stored leaves differ from trusted (choosing the model option a PNG came from)."""
        count = 0
        for key, value in stored.items():
            other = trusted.get(key) if isinstance(trusted, dict) else None
            if isinstance(value, dict) and isinstance(other, dict):
                count += self.differences(value, other, f"{prefix}{key}.")
            elif not self.is_overridden(f"{prefix}{key}") and not same(value, other):
                count += 1
        return count

    def walk(self, stored: dict, trusted: dict, prefix: str, choice: str) -> None:
        for key, value in stored.items():
            name = f"{prefix}{key}"
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", key):
                self.refuse(f"key {name!r} in its synth-config is not a config key")
            if name in CURRENT_RUN or self.is_overridden(name):
                continue
            known = isinstance(trusted, dict) and key in trusted
            if not known and name not in RECORD_KEYS:
                self.refuse(f"unknown key {name!r} in its synth-config (synth's config for {choice} has no such key)")
            rule = PLAIN.get(name) or PLAIN.get(f"{prefix}*")
            if rule is not None:
                check, kind = rule
                if not check(value):
                    what = "text" if kind in (TEXT, RECORD) else kind
                    self.refuse(f"{name}={value!r} in its synth-config must be {what}")
                if kind == RECORD and count_nodes(value) > 1000:
                    self.refuse(f"{name} in its synth-config is too large")
                # free text keeps `${` literal; the other plain kinds cannot hold it (words, numbers, sizes)
                self.accepted[name] = escape_all_interpolations(value) if kind in (TEXT, RECORD) else value
                continue
            if isinstance(value, dict) and isinstance(trusted[key], dict):
                self.walk(value, trusted[key], name + ".", choice)
            elif not same(value, trusted[key]):
                self.refuse(
                    f"{name}={value!r} is not taken from a PNG (synth's config for {choice} has {trusted[key]!r}); "
                    f"paths, class names and model settings come from synth's configs, give {name}=... on the "
                    "command line to use another"
                )


def replay_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The stored config of cfg.replay, checked against synth's own config, with every key the other overrides
    touched taken from cfg.

    cfg is the config Hydra composed from the same command line, so a group override (model=sd3) or a
    key override (seed=5, model.t5=false) already holds its composed value there; copying those values
    over the checked stored config regenerates the image exactly unless something was changed.
    """
    png = Path(str(cfg.replay)).expanduser()
    text = read_png_text(png)
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith(("replay=", "+replay="))])
    parsed = [o for o in parsed if not (o.key_or_group == "hydra" or o.key_or_group.startswith("hydra."))]
    overridden = {override.key_or_group for override in parsed}
    if CONFIG_KEY not in text and PARAMETERS_KEY in text:  # made by A1111 or Forge: map what its text says
        from synth.replay_a1111 import a1111_replay_config

        return a1111_replay_config(cfg, overridden, png, text[PARAMETERS_KEY])
    stored = read_stored_config(png, text)
    validator = Validator(png, overridden)

    # 1. The group choices the PNG records; a group given on the command line is the command line's.
    choices = []
    for group in GROUPS[1:]:
        section = stored.get(group)
        if group in overridden or not isinstance(section, dict) or "name" not in section:
            continue
        if section["name"] not in group_options(group):
            validator.refuse(f"{group}.name={section['name']!r} is not a {group} synth offers "
                             f"(choose one of: {', '.join(group_options(group))})")
        choices.append(f"{group}={section['name']}")

    # 2. synth's own config for those choices; the model option is the one of the stored family that the stored
    # model section matches best (model files have no name key; a PNG of model=tiny_sd15 matches it exactly).
    trusted, choice = None, "these choices"
    model = stored.get("model")
    if "model" not in overridden and isinstance(model, dict):
        families = model_family_options()
        candidates = [stem for stem, family in families.items() if family == model.get("family")]
        if not candidates:
            validator.refuse(f"model.family={model.get('family')!r} is not a family synth knows "
                             f"(one of: {', '.join(sorted(set(filter(None, families.values()))))})")
        candidates.sort(key=lambda stem: (stem != model.get("family"), stem))  # the family's own file wins a tie
        best = None
        for stem in candidates:
            composed = compose([f"model={stem}", *choices])
            score = validator.differences(model, OmegaConf.to_container(composed.model, resolve=True), "model.")
            if best is None or score < best[0]:
                best = (score, stem, composed)
        _, stem, trusted = best
        choices.insert(0, f"model={stem}")
        choice = " ".join(choices)
    elif "model" not in overridden and model is not None:
        validator.refuse(f"model={model!r} in its synth-config is not a mapping of model settings")
    if trusted is None:
        trusted = compose(choices)
        choice = " ".join(choices) or "its defaults"

    with open_dict(trusted):
        trusted.output_dir = cfg.output_dir
        trusted.replay = None
    plain = OmegaConf.to_container(trusted, resolve=True)

    # 3. Every stored key must be one of synth's; plain values are taken, the rest must match.
    validator.walk(stored, plain, "", choice)
    result = trusted
    with open_dict(result):
        for name, value in validator.accepted.items():
            OmegaConf.update(result, name, value, merge=False, force_add=True)

        # 4. What the command line says wins, as for any run.
        for override in parsed:
            key = override.key_or_group
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(result, parent) if parent else result
                if node is not None and leaf in node:
                    del node[leaf]
                continue
            OmegaConf.update(result, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
        result.logger = cfg.get("logger")
        result.output_dir = cfg.output_dir
        result.replay = None
    return result
