"""Prompt embeddings for the CLIP families (sd15, sdxl, sd3), with prompts longer than CLIP's 77 tokens.

diffusers truncates a CLIP prompt at 77 tokens. synth splits it instead into chunks of 75 tokens, wraps each
chunk in BOS ... EOS + padding (77 tokens, exactly what diffusers feeds for a short prompt), encodes every chunk
and concatenates the chunk embeddings along the sequence, as A1111 and ComfyUI do. The negative prompt is padded
with empty chunks to the same length (and the prompt to the negative's, if that is longer), because classifier-
free guidance stacks the two. The pooled embedding comes from the first chunk. A prompt of up to 75 tokens gives
exactly diffusers' own embeddings, so short prompts keep their pixels.

Textual-inversion keywords are expanded to all their tokens here, per tokenizer (see synth.textual_inversion).
`(words:1.3)` weights those tokens' CLIP states (A1111's emphasis); encoders without weights (T5, and the
families without CLIP: kolors, hunyuan_dit) read the text with the syntax removed.
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


def encode_sd15(pipe, prompt: str, negative: str, guidance: bool, model_cfg) -> dict:
    """SD1.x: the CLIP-L final hidden state (StableDiffusionPipeline.encode_prompt, with chunks)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    prompt, negative = expand(prompt, tokenizer), expand(negative, tokenizer)
    count = chunk_count(tokenizer, prompt, negative) if guidance else chunk_count(tokenizer, prompt)
    call = {"prompt_embeds": encode_clip(tokenizer, encoder, prompt, count, None)[0]}
    if guidance:
        call["negative_prompt_embeds"] = encode_clip(tokenizer, encoder, negative, count, None)[0]
    return call


def _two_clips(pipe, texts: dict, count: int):
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


def _clip_texts(pipe, text: str) -> dict:
    """The text each CLIP tokenizer sees: keywords expanded to that tokenizer's own embedding tokens."""
    return {id(tokenizer): expand(text, tokenizer) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2) if tokenizer is not None}


def _count(pipe, *texts: dict) -> int:
    return max(chunk_count(tokenizer, *(t[id(tokenizer)] for t in texts)) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2) if tokenizer is not None)


def encode_sdxl(pipe, prompt: str, negative: str, guidance: bool, model_cfg) -> dict:
    """SDXL: CLIP-L ++ CLIP-G penultimate states, CLIP-G pooled (StableDiffusionXLPipeline.encode_prompt, with chunks)."""
    positive, negative_texts = _clip_texts(pipe, prompt), _clip_texts(pipe, negative)
    count = _count(pipe, positive, negative_texts) if guidance else _count(pipe, positive)
    embeds, pooled = _two_clips(pipe, positive, count)
    call = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if guidance:
        if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            # SDXL was trained with zeroed embeddings for an empty prompt; diffusers does the same.
            call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"] = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"] = _two_clips(pipe, negative_texts, count)
    return call


def encode_sd3(pipe, prompt: str, negative: str, guidance: bool, model_cfg) -> dict:
    """SD3: CLIP-L ++ CLIP-G states zero-padded to T5's width, then T5's states along the sequence
    (StableDiffusion3Pipeline.encode_prompt, with CLIP chunks; T5 keeps model.max_sequence_length)."""
    max_length = int(model_cfg.get("max_sequence_length", 256))
    device = pipe._execution_device
    positive, negative_texts = _clip_texts(pipe, prompt), _clip_texts(pipe, negative)
    count = _count(pipe, positive, negative_texts) if guidance else _count(pipe, positive)

    def encode(texts: dict, t5_text: str):
        clip, pooled = _two_clips(pipe, texts, count)
        with torch.no_grad():
            t5 = pipe._get_t5_prompt_embeds(prompt=t5_text, max_sequence_length=max_length, device=device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), pooled

    embeds, pooled = encode(positive, plain_text(prompt))
    call = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if guidance:
        call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"] = encode(negative_texts, plain_text(negative))
    return call


def encode_kolors(pipe, prompt: str, negative: str, guidance: bool, model_cfg) -> dict:
    """Kolors reads the text itself (ChatGLM, up to model.max_sequence_length <= 256 tokens)."""
    call = {"prompt": plain_text(prompt), "negative_prompt": plain_text(negative) or None}
    if model_cfg.get("max_sequence_length") is not None:
        call["max_sequence_length"] = int(model_cfg.max_sequence_length)
    return call


def encode_text(pipe, prompt: str, negative: str, guidance: bool, model_cfg) -> dict:
    """Families whose pipeline reads the text itself (Hunyuan-DiT: BERT 77 and mT5 256 tokens, fixed by the model)."""
    return {"prompt": plain_text(prompt), "negative_prompt": plain_text(negative) or None}


ENCODERS = {"sd15": encode_sd15, "sdxl": encode_sdxl, "sd3": encode_sd3, "kolors": encode_kolors}


def prompt_kwargs(pipe, family: str, prompt: str, negative: str, guidance_scale: float, model_cfg) -> dict:
    """The pipeline-call arguments that carry the prompt: embeddings for the CLIP families, text for the rest."""
    guidance = guidance_scale > 1  # diffusers runs classifier-free guidance only above 1
    return ENCODERS.get(family, encode_text)(pipe, prompt, negative or "", guidance, model_cfg)
