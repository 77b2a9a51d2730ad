"""Prompt processing before generation: translation (a Marian model) and refinement (a BeautifulPrompt Bloom LM).

`prompter=translate` translates the positive prompt when it holds text in the source script (CJK for the
default Helsinki-NLP/opus-mt-zh-en); `prompter=refine` continues the prompt with a causal LM
(alibaba-pai/pai-bloom-1b1-text2prompt-sd by default) under a template, sampled with a seed, and keeps the
original prompt as the start of the result; `prompter=translate_refine` does both, in that order. The
negative prompt is never processed. `tiny_*` options use offline twins built by synth.twins_text.
"""

from __future__ import annotations

import logging
import re

from omegaconf import DictConfig

from synth.config import check_weights_source, hub_load

log = logging.getLogger(__name__)

# Unicode ranges of the scripts a translator can take as its source; translation runs only when one is present.
SCRIPTS = {
    "cjk": r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]",  # Chinese characters (opus-mt-zh-en)
    "kana": r"[\u3040-\u30ff]",  # Japanese hiragana and katakana (opus-mt-ja-en)
    "hangul": r"[\uac00-\ud7af\u1100-\u11ff]",  # Korean (opus-mt-ko-en)
    "cyrillic": r"[\u0400-\u04ff]",  # Russian, Ukrainian, ... (opus-mt-ru-en)
    "arabic": r"[\u0600-\u06ff]",  # Arabic (opus-mt-ar-en)
}
_loaded: dict = {}  # (role, path, device, dtype) -> (tokenizer, model): a sweep loads each model once


def enabled(prompter_cfg: DictConfig) -> bool:
    return bool(prompter_cfg.get("translator") or prompter_cfg.get("refiner"))


def check_prompter(cfg: DictConfig) -> None:
    """Input checks for the prompter group (no torch): model paths, script, template, sampling settings."""
    prompter = cfg.get("prompter")
    if prompter is None or not enabled(prompter):
        return
    translator, refiner = prompter.get("translator"), prompter.get("refiner")
    for role, settings in (("translator", translator), ("refiner", refiner)):
        if settings:
            check_model_path(f"prompter.{role}.path", settings)
            steps = settings.get("max_new_tokens")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"prompter.{role}.max_new_tokens={steps}: must be an integer >= 1")
    if translator:
        if translator.source_script not in SCRIPTS:
            raise ValueError(
                f"prompter.translator.source_script={translator.source_script}: choose one of {', '.join(SCRIPTS)}"
            )
        if not isinstance(translator.num_beams, int) or translator.num_beams < 1:
            raise ValueError(f"prompter.translator.num_beams={translator.num_beams}: must be an integer >= 1")
    if refiner:
        if "{prompt}" not in str(refiner.template):
            raise ValueError(f"prompter.refiner.template={refiner.template!r}: must contain {{prompt}}")
        rules = {
            "temperature": lambda v: v > 0,
            "top_p": lambda v: 0 < v <= 1,
            "top_k": lambda v: v >= 0 and float(v).is_integer(),
            "repetition_penalty": lambda v: v > 0,
        }
        allowed = {"temperature": "> 0", "top_p": "in (0, 1]", "top_k": "an integer >= 0", "repetition_penalty": "> 0"}
        for key, rule in rules.items():
            value = refiner.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not rule(value):
                raise ValueError(f"prompter.refiner.{key}={value}: must be {allowed[key]}")


def check_model_path(name: str, settings: DictConfig) -> None:
    """A prompter model is a twin (built on first use), a local transformers folder, or a hub id."""
    if settings.get("twin"):
        return
    path = str(settings.path)
    check_weights_source(
        name, path, "config.json", folder_note=" (not a transformers model folder)",
        offline_message=f"{name}={path}: not available offline; download it first, point {name} at a local folder, "
                        "or use an offline twin (prompter=tiny_translate, tiny_refine, tiny_translate_refine)",
    )


def load(role: str, settings: DictConfig, device, dtype):
    """(tokenizer, model) for the translator or refiner, loaded once per process and reused."""
    key = (role, str(settings.path), str(device), str(dtype))
    if key not in _loaded:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        if settings.get("twin"):
            from synth.twins_text import ensure_text_twin

            ensure_text_twin(settings.twin, settings.path)
        for old in [k for k in _loaded if k[0] == role]:
            del _loaded[old]  # one model per role in memory
        cls = AutoModelForSeq2SeqLM if role == "translator" else AutoModelForCausalLM
        log.info("loading %s from %s", role, settings.path)
        path = str(settings.path)
        tokenizer = hub_load(path, f"prompter.{role}.path", lambda: AutoTokenizer.from_pretrained(path))
        # transformers refuses .bin weights it cannot load with torch.load(weights_only=True).
        model = hub_load(path, f"prompter.{role}.path", lambda: cls.from_pretrained(path, dtype=dtype))
        model = model.to(device).eval()
        _loaded[key] = tokenizer, model
    return _loaded[key]


def needs_translation(prompt: str, script: str) -> bool:
    return re.search(SCRIPTS[script], prompt) is not None


def translate(prompt: str, settings: DictConfig, device, dtype) -> str:
    """The prompt translated by a Marian (or any seq2seq) model, with beam search (deterministic)."""
    import torch

    tokenizer, model = load("translator", settings, device, dtype)
    inputs = tokenizer(prompt, return_tensors="pt", truncation=True).to(device)
    with torch.no_grad():
        output = model.generate(**inputs, num_beams=int(settings.num_beams), max_new_tokens=int(settings.max_new_tokens))
    return tokenizer.decode(output[0], skip_special_tokens=True).strip()


def refine(prompt: str, settings: DictConfig, seed: int, device, dtype) -> str:
    """The prompt extended by a BeautifulPrompt-style causal LM, sampled under `seed`; starts with the prompt."""
    import torch

    tokenizer, model = load("refiner", settings, device, dtype)
    ids = tokenizer(str(settings.template).format(prompt=prompt), return_tensors="pt").input_ids.to(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            max_new_tokens=int(settings.max_new_tokens),
            temperature=float(settings.temperature),
            top_k=int(settings.top_k),
            top_p=float(settings.top_p),
            repetition_penalty=float(settings.repetition_penalty),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    text = text.strip().split("\n")[0].strip(" ,")  # the model's first answer line
    if not text:
        return prompt
    return text if text.startswith(prompt) else f"{prompt}, {text}"


def process_prompt(prompt: str, prompter_cfg: DictConfig, seed: int, device, dtype) -> str:
    """The positive prompt after the configured translation and refinement (unchanged for prompter=none)."""
    result = prompt
    translator, refiner = prompter_cfg.get("translator"), prompter_cfg.get("refiner")
    if translator and needs_translation(result, translator.source_script):
        result = translate(result, translator, device, dtype)
        log.info("translated prompt: %r -> %r", prompt, result)
    if refiner:
        before = result
        result = refine(result, refiner, seed, device, dtype)
        log.info("refined prompt: %r -> %r", before, result)
    return result


def check_prompt_inputs(cfg: DictConfig) -> None:
    """The prompter group's and textual_inversion's input checks, run by synth.checks.check_inputs."""
    from synth.families import FAMILIES, get_family
    from synth.textual_inversion import check_textual_inversion

    family = get_family(cfg.model.family)
    check_prompter(cfg)
    check_textual_inversion(cfg, family, FAMILIES)
    limit = family.max_sequence_length_limit  # the pipelines' own limits (T5, ChatGLM)
    length = cfg.model.get("max_sequence_length")
    if limit and length is not None and (not isinstance(length, int) or not 1 <= length <= limit):
        raise ValueError(f"model.max_sequence_length={length}: {cfg.model.family} takes 1..{limit} tokens")


def record_prompt(image_cfg: DictConfig, original: str, processed: str) -> None:
    """Store the processed prompt as the image's prompt, the original beside it, and switch the prompter off,
    so that replaying the image uses the processed prompt and never runs the prompter again."""
    from omegaconf import OmegaConf, open_dict

    from synth.cli_args import escape_all_interpolations

    if not enabled(image_cfg.prompter):
        return
    with open_dict(image_cfg):
        # Escaped: the config is resolved when it is written, and a prompt's `${...}` is text, never an interpolation.
        ran = OmegaConf.to_container(image_cfg.prompter, resolve=True)
        image_cfg.prompt = escape_all_interpolations(processed)
        image_cfg.prompter = escape_all_interpolations({"name": "none", "original_prompt": original, "processed_by": ran})
