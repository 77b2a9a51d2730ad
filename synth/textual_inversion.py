"""Textual-inversion embeddings: safe loading of A1111, safetensors and diffusers files into CLIP text encoders.

`textual_inversion=[path, ...]` names files or folders. Each file is one embedding whose keyword is the file's
stem (A1111 and safetensors files) or the token stored in it (diffusers `learned_embeds` files, one key). An
embedding of n vectors adds n tokens (`kw`, `kw_1`, ... as diffusers names them) and the keyword is expanded to
all of them wherever it appears in the prompt or the negative prompt.

Files load with safetensors or `torch.load(weights_only=True)`: a pickle that needs arbitrary code to unpickle is
refused before any of it runs.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
@dataclass
class Embedding:
    keyword: str
    path: Path
    vectors: dict  # file key ("clip_l", "clip_g") -> float tensor (n_vectors, width)


def embedding_paths(value) -> list[Path]:
    """The embedding files that `textual_inversion` names: files as given, folders' embedding files sorted."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    files = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"textual_inversion={item}: the folder holds no {', '.join(SUFFIXES)} file")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ValueError(f"textual_inversion={item}: unsupported file type; use {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"textual_inversion={item}: no such file or folder")
    return files


def check_textual_inversion(cfg: DictConfig, family, families) -> None:
    """Input checks (no torch): the files exist, have a known type, and the family takes embeddings
    (`families`: the registry, to name those that do)."""
    value = cfg.get("textual_inversion")
    if value is not None and not isinstance(value, (str, list, ListConfig)):
        raise ValueError(f"textual_inversion={value}: give a path or a list of paths, e.g. textual_inversion=[a.pt,b.pt]")
    files = embedding_paths(value)
    if files and not family.textual_inversion_targets:
        takers = [name for name, each in families.items() if each.textual_inversion_targets]
        raise ValueError(
            f"textual_inversion: {family.name} has no CLIP text encoder to take embeddings; "
            f"textual inversion works with {', '.join(takers)}"
        )


def read_file(path: Path) -> dict:
    """The tensors of an embedding file, loaded without running code from it."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise ValueError(f"textual_inversion={path}: not a readable .safetensors file ({error})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported pickle content"
        raise ValueError(
            f"textual_inversion={path}: refused, the file needs arbitrary code to unpickle ({reason}); "
            "only tensors, dicts and plain values are loaded — convert it to .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"textual_inversion={path}: not a readable torch file ({error})") from None


def parse(path: Path, state: dict) -> Embedding:
    """An Embedding from a loaded file: A1111 .pt (string_to_param), safetensors emb_params, SDXL clip_l/clip_g,
    or diffusers learned_embeds ({token: tensor})."""
    import torch

    def matrix(tensor, key):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or not tensor.is_floating_point():
            raise ValueError(f"textual_inversion={path}: {key} is not a float vector or matrix")
        if tensor.numel() == 0:
            raise ValueError(f"textual_inversion={path}: {key} is empty")
        vectors = tensor.detach().reshape(-1, tensor.shape[-1]).float()
        if not torch.isfinite(vectors).all():  # inf or nan vectors turn every prompt using the keyword into nan
            raise ValueError(f"textual_inversion={path}: {key} holds nan or inf values (as float32); the embedding is broken")
        return vectors

    if not isinstance(state, dict):
        raise ValueError(f"textual_inversion={path}: expected a dict of tensors, got {type(state).__name__}")
    keyword = path.stem
    if "string_to_param" in state:  # A1111 .pt: {"string_to_param": {"*": tensor}, "name": ...}
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"textual_inversion={path}: string_to_param should hold one tensor")
        vectors = {"clip_l": matrix(next(iter(params.values())), "string_to_param")}
    elif "emb_params" in state:  # A1111 .safetensors
        vectors = {"clip_l": matrix(state["emb_params"], "emb_params")}
    elif "clip_l" in state or "clip_g" in state:  # SDXL embeddings
        vectors = {key: matrix(state[key], key) for key in ("clip_l", "clip_g") if key in state}
    elif len(state) == 1:  # diffusers learned_embeds: the key is the token
        keyword, tensor = next(iter(state.items()))
        vectors = {"clip_l": matrix(tensor, keyword)}
    else:
        raise ValueError(
            f"textual_inversion={path}: unknown embedding format (keys {sorted(map(str, state))[:6]}); expected "
            "string_to_param (A1111 .pt), emb_params (.safetensors), clip_l/clip_g (SDXL) or one {token: tensor}"
        )
    if not re.fullmatch(r"[^\s,()\[\]:]+", keyword):
        raise ValueError(f"textual_inversion={path}: keyword {keyword!r} must be one word without ,()[]:")
    return Embedding(keyword, path, vectors)


def read_embeddings(cfg: DictConfig) -> list[Embedding]:
    """Read and parse every embedding file cfg.textual_inversion names (no model needed)."""
    embeddings = [parse(path, read_file(path)) for path in embedding_paths(cfg.get("textual_inversion"))]
    keywords = [e.keyword for e in embeddings]
    for keyword in set(keywords):
        if keywords.count(keyword) > 1:
            clash = [str(e.path) for e in embeddings if e.keyword == keyword]
            raise ValueError(f"textual_inversion: keyword {keyword!r} comes from more than one file: {', '.join(clash)}")
    return embeddings


def embeddings_key(cfg: DictConfig) -> str:
    """What identifies the loaded embeddings for pipeline reuse: each file's path, size and modification time."""
    files = embedding_paths(cfg.get("textual_inversion"))
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def plan(embeddings: list[Embedding], family, pipe) -> list[tuple]:
    """Which vectors go into which encoder: [(tokenizer, text_encoder, keyword, vectors)], widths checked.
    The family (synth.families) names its CLIP encoders: Family.textual_inversion_targets."""
    steps = []
    slots = [(key, getattr(pipe, tok), getattr(pipe, enc)) for tok, enc, key in family.textual_inversion_targets]
    for embedding in embeddings:
        targets = [(key, tok, enc) for key, tok, enc in slots if key in embedding.vectors and enc is not None]
        family.check_embedding(embedding)
        if not targets:
            raise ValueError(f"textual_inversion={embedding.path}: none of its vectors ({', '.join(embedding.vectors)}) fit {family.name}")
        for key, tokenizer, encoder in targets:
            vectors = embedding.vectors[key]
            width = encoder.get_input_embeddings().weight.shape[-1]
            if vectors.shape[-1] != width:
                raise ValueError(
                    f"textual_inversion={embedding.path}: embedding width {vectors.shape[-1]} does not fit {family.name}'s "
                    f"{key.replace('_', '-').upper()} text encoder of width {width} (an embedding for another model?)"
                )
            steps.append((tokenizer, encoder, embedding.keyword, vectors))
    return steps


def add_embeddings(pipe, family, embeddings: list[Embedding]) -> None:
    """Load embeddings into pipe's text encoders: diffusers' loader where the pipeline has one (SD1.5, SDXL),
    synth's own for SD3 (diffusers has no SD3 loader)."""
    if not embeddings:
        return
    steps = plan(embeddings, family, pipe)
    for tokenizer, encoder, keyword, vectors in steps:
        if hasattr(pipe, "load_textual_inversion"):
            pipe.load_textual_inversion({keyword: vectors}, token=keyword, tokenizer=tokenizer, text_encoder=encoder)
        else:
            add_tokens(tokenizer, encoder, keyword, vectors)
    log.info("textual inversion: %s", ", ".join(f"{e.keyword} ({e.path.name})" for e in embeddings))


def add_tokens(tokenizer, encoder, keyword: str, vectors) -> None:
    """Add keyword, keyword_1, ... to the tokenizer and their vectors to the encoder's token embeddings
    (adapted from diffusers' TextualInversionLoaderMixin.load_textual_inversion, for pipelines without it)."""
    import torch

    tokens = [keyword] + [f"{keyword}_{i}" for i in range(1, vectors.shape[0])]
    vocab = tokenizer.get_vocab()
    taken = [token for token in tokens if token in vocab]
    if taken:
        raise ValueError(f"textual_inversion: keyword {keyword!r} is already a token of the tokenizer ({taken[0]}); rename the file")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are overwritten below
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = vectors.to(weight.device, weight.dtype)


def expand(prompt: str, tokenizer) -> str:
    """Replace each multi-vector keyword with all its tokens (`kw` -> `kw kw_1 kw_2`), as whole words only."""
    added = tokenizer.added_tokens_encoder if hasattr(tokenizer, "added_tokens_encoder") else {}
    for token in sorted(added, key=len, reverse=True):
        if f"{token}_1" not in added:
            continue  # a single-vector keyword is its own token
        tokens = [token]
        while f"{token}_{len(tokens)}" in added:
            tokens.append(f"{token}_{len(tokens)}")
        # CLIP tokenizers lowercase the text, so a keyword matches in any case, as the tokenizer matches it.
        pattern = rf"(?<![\w<>-]){re.escape(token)}(?![\w<>-])"
        prompt = re.sub(pattern, " ".join(tokens), prompt, flags=re.IGNORECASE)
    return prompt
