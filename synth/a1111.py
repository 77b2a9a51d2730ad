"""The `parameters` text in A1111's and civitai's vocabulary: writing it for synth's PNGs, reading it strictly back.

The layout is A1111's infotext: the prompt (with `<lora:name:scale>` tokens), `Negative prompt: ...`, then one
line of `Key: value` fields in A1111's order, a value holding `,` `:` or a newline written as a JSON string:

    Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash, Model, Denoising strength,
    Hires upscale, Hires resize, Hires steps, Hires upscaler, Hires stages, Lora hashes, TI hashes, Hashes,
    Family, Version

Sampler names are A1111's for the scheduler that actually ran (diffusers' scheduler overview maps the two);
`Schedule type` (A1111 1.9+) is written where the sigmas are not the sampler's own (Karras, Exponential, Beta,
trailing spacing = SGM Uniform) and `Simple` for the flow models' Euler, as Forge writes it. `Size` is the first
pass, as in A1111: a high-resolution chain writes its base stage there and the rest as `Hires upscale`
(final / base), `Hires steps`, `Hires upscaler` and the refinement's `Denoising strength`. Hashes: synth.hashes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# diffusers scheduler class -> A1111's sampler name (diffusers' "Schedulers" overview table; A1111's sampler list)
SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",  # diffusers' SD configs set skip_prk_steps: the linear multistep method of PNDM
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "FlowMatchEulerDiscreteScheduler": "Euler",  # Forge and ComfyUI exporters: "Euler" (+ Simple) for flow models
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)  # sigma-linear flow schedules: A1111/Forge "Simple"
SIGMA_SCHEDULES = (("use_karras_sigmas", "Karras"), ("use_exponential_sigmas", "Exponential"),
                   ("use_beta_sigmas", "Beta"))
UPSCALERS = {"lanczos": "Lanczos", "latent": "Latent"}  # synth highres.upscale -> A1111's Hires upscaler
FIELD_ORDER = (  # A1111's order (processing.create_infotext), synth's own fields last
    "Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Seed", "Size", "Model hash", "Model", "Denoising strength",
    "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires stages", "Lora hashes", "TI hashes",
    "Hashes", "Family", "Version")


def sampler_name(class_name: str, config: dict) -> tuple[str, str | None]:
    """(A1111 sampler, A1111 schedule type or None for the sampler's own) of a diffusers scheduler."""
    if class_name == "DPMSolverMultistepScheduler":
        algorithm = str(config.get("algorithm_type", "dpmsolver++"))
        name = f"DPM{'++' if '++' in algorithm else ''} {config.get('solver_order', 2)}M"
        name += " SDE" if algorithm.startswith("sde-") else ""
    else:
        name = SAMPLERS.get(class_name, class_name.removesuffix("Scheduler"))
    for flag, schedule in SIGMA_SCHEDULES:
        if config.get(flag):
            return name, schedule
    if class_name in FLOW_SCHEDULERS:
        return name, "Simple"
    if config.get("timestep_spacing") == "trailing":  # diffusers' table: sgm_uniform = trailing spacing
        return name, "SGM Uniform"
    return name, None


def scheduler_identity(scheduler) -> tuple[str, dict]:
    """(class name, config) of a diffusers scheduler object, or of a (class name, config) pair as given."""
    if isinstance(scheduler, tuple):
        return scheduler[0], dict(scheduler[1])
    return type(scheduler).__name__, dict(scheduler.config)


def configured_scheduler(scheduler_cfg, model_cfg) -> tuple[str, dict] | None:
    """The scheduler a run with these scheduler and model configs uses, read from the configs and the weights'
    scheduler_config.json without loading anything (as synth.pipelines.make_scheduler builds it): (class name,
    config), or None when the weights' scheduler cannot be read here."""
    from omegaconf import OmegaConf

    base = weights_scheduler_config(model_cfg)
    choice = scheduler_cfg if scheduler_cfg.get("cls") else model_cfg.get("default_scheduler")
    if choice:
        kwargs = OmegaConf.to_container(choice.kwargs, resolve=True) if choice.get("kwargs") else {}
        return str(choice.cls).rsplit(".", 1)[-1], {**(base or {}), **kwargs}
    if base is not None and isinstance(base.get("_class_name"), str):
        return base["_class_name"], base
    return None


def weights_scheduler_config(model_cfg) -> dict | None:
    """The scheduler config stored with the weights (a local folder, a single file's config source, or a hub id
    in the local hub cache); None where it is not on this machine."""
    from synth.config import HUB_ID, is_single_file

    source = str(model_cfg.single_file_config if is_single_file(str(model_cfg.path)) else model_cfg.path)
    local = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
    path = local if local.is_file() else None
    if path is None and HUB_ID.match(source) and not Path(source).expanduser().exists():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "scheduler/scheduler_config.json")
        path = Path(found) if isinstance(found, str) else None
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- writing ------------------------------------------------------------------------------------------------


@dataclass
class Resources:
    """What a run loaded, named and hashed as A1111 names them; computed once per run (hashing is cached)."""

    model_name: str
    model_hash: str | None
    loras: list[tuple[str, float, str]] = field(default_factory=list)  # (name, scale, Lora hash)
    embeddings: list[tuple[str, str]] = field(default_factory=list)  # (keyword, TI hash)


def resource_name(name: str) -> str:
    """A name as A1111 writes it in `Lora hashes`/`TI hashes` and tokens: without `:` `,` `<` `>`."""
    return re.sub(r"[:,<>]", "", name)


def resources(cfg) -> Resources:
    """The model, LoRAs (lora.path, lora.scale) and embeddings (textual_inversion) of cfg, with their hashes."""
    from synth import hashes
    from synth.loras import lora_entries
    from synth.textual_inversion import read_embeddings

    loras = [(resource_name(Path(path).stem), scale, hashes.lora_hash(path)) for path, scale in lora_entries(cfg.get("lora"))]
    embeddings = [(e.keyword, hashes.embedding_hash(e.path)) for e in read_embeddings(cfg)] \
        if cfg.get("textual_inversion") else []
    return Resources(hashes.model_name(cfg.model), hashes.model_hash(cfg.model), loras, embeddings)


def quote(value) -> str:
    """A1111's infotext quoting: a value holding `,` `:` or a newline is written as JSON."""
    text = str(value)
    if isinstance(value, (dict, list)) or any(char in text for char in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return text


def number(value) -> str:
    """1.0 -> 1, 0.75 -> 0.75: numbers as a person writes them (and as civitai's `<lora:...>` pattern reads
    them), without losing digits (repr is the shortest text that reads back as the same float)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def used_keyword(keyword: str, *texts: str) -> bool:
    """Whether an embedding keyword appears as a word in the prompts (as synth.textual_inversion matches it)."""
    pattern = rf"(?<![\w<>-]){re.escape(keyword)}(?![\w<>-])"
    return any(re.search(pattern, text, flags=re.IGNORECASE) for text in texts)


def a1111_parameters(cfg, width: int, height: int, steps: int, guidance: float, scheduler=None,
                     found: Resources | None = None, plan=None) -> str:
    """The `parameters` text of one image of cfg (see the module docstring).

    scheduler: the diffusers scheduler that ran (or its (class name, config)); None reads it from the configs.
    found: the run's Resources (None computes them); plan: the stages that ran (synth.stages; None plans them).
    """
    from omegaconf import OmegaConf

    from synth.families import get_family
    from synth.stages import plan_stages

    identity = scheduler_identity(scheduler) if scheduler is not None else configured_scheduler(cfg.scheduler, cfg.model)
    sampler, schedule = sampler_name(*identity) if identity is not None else (str(cfg.scheduler.name), None)
    found = found if found is not None else resources(cfg)
    if plan is None:
        plan = plan_stages(cfg.get("highres"), get_family(cfg.model.family).name, cfg.model.native_size, width, height,
                           steps)
    prompt, negative = str(cfg.prompt), str(cfg.negative_prompt or "")
    first = plan[0]
    fields = {"Steps": steps, "Sampler": sampler, "Schedule type": schedule, "Seed": cfg.seed,
              "Size": f"{first.width}x{first.height}", "Model hash": found.model_hash, "Model": found.model_name}
    for name, key in get_family(cfg.model.family).a1111_guidance_fields.items():
        fields[name] = guidance if key == "guidance_scale" else OmegaConf.select(cfg, key, default=1.0)
    if cfg.init_image is not None:
        fields["Denoising strength"] = cfg.denoise_strength
    fields.update(hires_fields(cfg, plan, image_to_image=cfg.init_image is not None))
    tokens = [f"<lora:{name}:{number(scale)}>" for name, scale, _ in found.loras]
    if found.loras:
        fields["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, _, digest in found.loras)
    embeddings = [(keyword, digest) for keyword, digest in found.embeddings if used_keyword(keyword, prompt, negative)]
    if embeddings:
        fields["TI hashes"] = ", ".join(f"{resource_name(keyword)}: {digest}" for keyword, digest in embeddings)
    civitai = {"model": found.model_hash} if found.model_hash else {}
    civitai.update({f"lora:{name}": digest for name, _, digest in found.loras})
    civitai.update({f"embed:{resource_name(keyword)}": digest for keyword, digest in embeddings})
    fields.update({"Hashes": civitai or None, "Family": cfg.model.family, "Version": "synth"})
    lines = [" ".join(filter(None, [prompt, *tokens]))]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    ordered = sorted(fields.items(), key=lambda item: FIELD_ORDER.index(item[0]))
    lines.append(", ".join(f"{key}: {quote(number(value) if key != 'Hashes' else value)}"
                           for key, value in ordered if value is not None))
    return "\n".join(lines)


def hires_fields(cfg, plan, image_to_image: bool) -> dict:
    """A1111's hires-fix fields for the refinements after the first stage of plan (none for a one-stage plan)."""
    refinements = plan[1:]
    if not refinements:
        return {}
    first, last = plan[0], plan[-1]
    scale = round(last.width / first.width, 4)
    fields = {"Hires upscale": scale}
    if int(first.width * scale) != last.width or int(first.height * scale) != last.height:
        fields["Hires resize"] = f"{last.width}x{last.height}"  # the exact target where the factor is rounded
    fields["Hires steps"] = refinements[0].steps
    fields["Hires upscaler"] = UPSCALERS.get(str(cfg.highres.get("upscale", "lanczos")), "Lanczos")
    if not image_to_image:  # image-to-image already wrote its own Denoising strength
        fields["Denoising strength"] = refinements[0].strength
    if len(refinements) > 1 or image_to_image:  # synth's own: A1111's hires fix has one refinement
        fields["Hires stages"] = ", ".join(f"{s.width}x{s.height} at {number(s.strength)} ({s.steps} steps)"
                                           for s in refinements)
    return fields


# --- reading (replay= of an A1111 or Forge PNG) -----------------------------------------------------------------

MAX_TEXT = 100_000  # characters; A1111 texts are a few hundred
MAX_FIELDS = 300
KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")  # A1111's infotext key: a word, then words, spaces, - and / (greedy:
# a lazy key followed by optional spaces backtracks quadratically on a long line without a colon)


@dataclass
class Infotext:
    """An A1111 `parameters` text, read: prompt, negative prompt, the settings fields, lines after them."""

    prompt: str
    negative_prompt: str
    fields: dict = field(default_factory=dict)  # key -> str, or the dict/list of a JSON value (Hashes: {...})
    extra_lines: int = 0  # lines after the settings line (extensions' templates): not read


def parse_settings(line: str) -> dict:
    """One settings line, `Key: value, Key: "quoted, value", Hashes: {...}`; ValueError naming what is malformed."""
    decoder, fields, position = json.JSONDecoder(), {}, 0
    while position < len(line):
        match = KEY.match(line, position)
        if match is None:
            raise ValueError(f"its settings line cannot be read at {line[position:].lstrip()[:30]!r} (expected Key: value)")
        key, position = match.group(1).rstrip(), match.end()
        if key in fields:
            raise ValueError(f"its settings line gives {key!r} twice")
        if position < len(line) and line[position] in "\"{[":
            quoted = line[position] == '"'
            try:
                value, position = decoder.raw_decode(line, position)
            except (ValueError, RecursionError):
                raise ValueError(f"{key}: its value is not complete JSON ({'an unclosed quote' if quoted else 'an unclosed bracket'})") from None
            if quoted and not isinstance(value, str):
                raise ValueError(f"{key}: its quoted value is not text")
            from synth.images import count_nodes

            if count_nodes(value) > 1000:
                raise ValueError(f"{key}: its value is too large")
            rest = re.match(r"\s*(,|$)", line[position:])
            if rest is None:
                raise ValueError(f"{key}: text after its quoted value: {line[position:position + 30]!r}")
            position += rest.end()
        else:
            end = line.find(",", position)
            end = len(line) if end < 0 else end
            value, position = line[position:end].strip(), end + 1
        fields[key] = value
        if len(fields) > MAX_FIELDS:
            raise ValueError(f"its settings line has more than {MAX_FIELDS} fields")
    return fields


def parse_parameters(text: str) -> Infotext:
    """An A1111/Forge `parameters` text, read strictly (it is untrusted: nothing in it is evaluated).

    As A1111 reads it: the settings line is the last line (or, as civitai reads it, the last line starting with
    `Steps: `); lines before it are the prompt up to a line starting `Negative prompt:`, the negative prompt after.
    """
    if len(text) > MAX_TEXT:
        raise ValueError(f"its parameters text is longer than {MAX_TEXT} characters; not an A1111 text")
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text.replace("\r\n", "\n")):
        raise ValueError("its parameters text holds control characters; not an A1111 text")
    lines = text.replace("\r\n", "\n").strip().split("\n")
    starts = [index for index, line in enumerate(lines) if line.startswith("Steps: ")]
    if not starts:
        raise ValueError("its parameters text has no settings line (Steps: ..., Sampler: ..., CFG scale: ...)")
    settings = starts[-1]
    fields = parse_settings(lines[settings].strip())
    prompt, negative, in_negative = [], [], False
    for line in lines[:settings]:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):]
        (negative if in_negative else prompt).append(line.strip())
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), fields, len(lines) - settings - 1)
