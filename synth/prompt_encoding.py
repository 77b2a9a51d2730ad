"""Prompt embeddings for the CLIP families (SD1.x, SDXL, SD3: their encoders are in synth/families/), with prompts longer than CLIP's 77 tokens.

diffusers truncates a CLIP prompt at 77 tokens. synth splits it instead into chunks of 75 tokens, wraps each
chunk in BOS ... EOS + padding (77 tokens, exactly what diffusers feeds for a short prompt), encodes every chunk
and concatenates the chunk embeddings along the sequence, as A1111 and ComfyUI do. The negative prompt is padded
with empty chunks to the same length (and the prompt to the negative's, if that is longer), because classifier-
free guidance stacks the two. The pooled embedding comes from the first chunk. A prompt of up to 75 tokens gives
exactly diffusers' own embeddings, so short prompts keep their pixels.

Textual-inversion keywords are expanded to all their tokens here, per tokenizer (see synth.textual_inversion).
`(words:1.3)` weights those tokens' CLIP states (A1111's emphasis); encoders without weights (T5, and the
families without CLIP: Kolors, Hunyuan-DiT) read the text with the syntax removed.
"""

from __future__ import annotations

import re

import torch

from synth.textual_inversion import expand

# `(words:1.3)`: the A1111 / ComfyUI weighting syntax (only this explicit form; plain parentheses stay text).
WEIGHTED = re.compile(r"\(([^()]+):\s*(\d+(?:\.\d+)?)\)")


def plain_text(text: str) -> str:
    """The prompt without weighting syntax: what encoders that take no weights (T5, ChatGLM, BERT) read."""
    return WEIGHTED.sub(r"\1", text)


def weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """The prompt's token ids (no BOS/EOS) and each token's weight (1.0 outside `(words:w)`)."""
    if not WEIGHTED.search(text):
        ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        return ids, [1.0] * len(ids)
    ids, weights, last = [], [], 0
    segments = []
    for match in WEIGHTED.finditer(text):
        segments += [(text[last : match.start()], 1.0), (match.group(1), float(match.group(2)))]
        last = match.end()
    segments.append((text[last:], 1.0))
    for segment, weight in segments:
        if segment.strip():
            segment_ids = tokenizer(segment, add_special_tokens=False, truncation=False).input_ids
            ids += segment_ids
            weights += [weight] * len(segment_ids)
    return ids, weights


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def token_chunks(tokenizer, text: str) -> list[list[int]]:
    """The prompt's token ids (no BOS/EOS) cut into chunks of model_max_length - 2 (75 for CLIP)."""
    return _chunks(weighted_tokens(tokenizer, text)[0], tokenizer.model_max_length - 2)


def chunk_input_ids(tokenizer, chunks: list[list[int]], count: int) -> torch.Tensor:
    """(count, 77) ids: each chunk as BOS + tokens + EOS + padding; missing chunks are empty ones."""
    length = tokenizer.model_max_length
    rows = []
    for chunk in chunks + [[]] * (count - len(chunks)):
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def chunk_count(tokenizer, *texts: str) -> int:
    return max(len(token_chunks(tokenizer, text)) for text in texts)


@torch.no_grad()
def encode_clip(tokenizer, encoder, text: str, count: int, hidden_layer: int | None):
    """(1, count * 77, width) embeddings of text and the first chunk's pooled output (None without projection).

    hidden_layer=None takes the final layer-normed output (SD1.5); -2 the penultimate hidden state (SDXL, SD3).
    """
    ids, weights = weighted_tokens(tokenizer, text)
    size = tokenizer.model_max_length - 2
    ids = chunk_input_ids(tokenizer, _chunks(ids, size), count).to(encoder.device)
    mask = (ids != tokenizer.pad_token_id).long() if getattr(encoder.config, "use_attention_mask", False) else None
    if mask is not None:
        mask[:, :2] = 1  # BOS and the EOS of an empty chunk are real tokens even where pad == eos
    output = encoder(ids, attention_mask=mask, output_hidden_states=hidden_layer is not None)
    states = output[0] if hidden_layer is None else output.hidden_states[hidden_layer]
    pooled = output[0][:1] if output[0].ndim == 2 else None  # CLIPTextModelWithProjection: text_embeds
    if any(weight != 1.0 for weight in weights):
        scale = torch.ones(states.shape[:2], dtype=torch.float64, device=states.device)
        for index, chunk in enumerate(_chunks(weights, size)):
            scale[index, 1 : 1 + len(chunk)] = torch.tensor(chunk, dtype=torch.float64)
        states = emphasise(states, scale)
    return states.reshape(1, -1, states.shape[-1]).to(encoder.dtype), pooled


# Below this share of the states' mean magnitude a chunk's mean counts as zero: restoring it would divide by
# (nearly) nothing. Layer-normed CLIP outputs (SD1.x) have means of a few 1e-3 of their magnitude on real weights.
MEAN_FLOOR = 1e-4


def emphasise(states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis on (chunks, 77, width) states: scale each token by its weight, then per chunk multiply by
    old mean / new mean so the chunk keeps its overall mean (modules/sd_hijack_clip.py, process_tokens).

    A1111 divides by the weighted chunk's mean unguarded; where that mean is near zero or has the other sign
    than the unweighted one, the ratio explodes or flips every state. synth then keeps the weighted states
    as they are (no restore) for that chunk, which is ComfyUI's plain weighting. Computed in float64, so
    the outcome never hangs on float32 rounding order.
    """
    original = states.double()
    weighted = original * scale[..., None]
    old_mean = original.mean(dim=(1, 2), keepdim=True)
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    floor = MEAN_FLOOR * weighted.abs().mean(dim=(1, 2), keepdim=True)
    safe = (new_mean.abs() > floor) & (old_mean.abs() > floor) & (old_mean * new_mean > 0)
    ratio = torch.where(safe, old_mean / torch.where(safe, new_mean, torch.ones_like(new_mean)), torch.ones_like(new_mean))
    return (weighted * ratio).to(states.dtype)


def two_clips(pipe, texts: dict, count: int):
    """CLIP-L and CLIP-G penultimate states concatenated on features, and CLIP-G's (SDXL) or both (SD3) pooled."""
    states, pooled = [], []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        if encoder is None:  # the SDXL refiner has no CLIP-L
            continue
        embeds, pool = encode_clip(tokenizer, encoder, texts[id(tokenizer)], count, hidden_layer=-2)
        states.append(embeds)
        if pool is not None:
            pooled.append(pool)
    return torch.cat(states, dim=-1), torch.cat(pooled, dim=-1)


def clip_texts(pipe, text: str) -> dict:
    """The text each CLIP tokenizer sees: keywords expanded to that tokenizer's own embedding tokens."""
    return {id(tokenizer): expand(text, tokenizer) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2) if tokenizer is not None}


def count_chunks(pipe, *texts: dict) -> int:
    return max(chunk_count(tokenizer, *(t[id(tokenizer)] for t in texts)) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2) if tokenizer is not None)


def prompt_kwargs(pipe, family, prompt: str, negative: str, guidance_scale: float, model_cfg) -> dict:
    """The pipeline-call arguments that carry the prompt, from the family's encoder (synth.families): embeddings
    for the CLIP families, text for the rest."""
    guidance = guidance_scale > 1  # diffusers runs classifier-free guidance only above 1
    return family.encode_prompt(pipe, prompt, negative or "", guidance, model_cfg)
