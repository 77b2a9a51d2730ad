"""Tiny offline twins of the prompter's models: a Marian zh->en translator and a Bloom prompt refiner.

Each twin is an ordinary transformers folder (config.json, safetensors weights, tokenizer files) that loads
through `AutoTokenizer` / `AutoModelFor*.from_pretrained` exactly like Helsinki-NLP/opus-mt-zh-en and
alibaba-pai/pai-bloom-1b1-text2prompt-sd. Tokenizers are trained here: SentencePiece for Marian (a source
model on Chinese and English captions, a target model on English ones, one shared vocab.json), byte-level BPE
for Bloom. The weights are seeded and then fitted for a few hundred steps on synth.twin_tokenizers.CAPTIONS pairs, so
the translator turns the corpus's Chinese captions into their English ones and the refiner continues a prompt
with style words: a few seconds of CPU that make the tests check behaviour rather than random tokens.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import torch

from synth.twin_tokenizers import CAPTIONS, _learn_bpe_merges
from synth.twins import build_in_place, seed_component

KINDS = ("marian", "bloom")

# Chinese captions of synth.twin_tokenizers.CAPTIONS and their English translations.
TRANSLATIONS = {
    "一只猫坐在窗台上": "a cat sitting on a windowsill",
    "一只狗在草地上奔跑": "a dog running on the grass",
    "一辆红色的汽车停在街道上": "a red car parked on a street",
    "山间的湖泊与日落": "a mountain lake at sunset",
    "一位老人的肖像": "a portrait of an old man",
    "桌子上有一碗水果": "a bowl of fruit on a table",
    "雨夜中的城市街道": "a city street at night in the rain",
    "宇航员在月球上骑马": "an astronaut riding a horse on the moon",
    "一朵黄色的花的特写照片": "a close up photo of a yellow flower",
    "秋天的森林小路": "a forest path in autumn",
    "一杯咖啡，白色背景": "a cup of coffee on a white background",
    "中国山水画，高质量": "a chinese landscape painting, high quality",
}
# What the refiner twin learns to append, BeautifulPrompt-style.
STYLE = ", highly detailed, digital painting, soft light, sharp focus, trending on artstation"
# The BeautifulPrompt template (the model cards of pai-bloom-1b1-text2prompt-sd and -sd-v2).
TEMPLATE = "Instruction: Give a simple description of the image to generate a drawing prompt.\nInput: {prompt}\nOutput:"


def _english() -> list[str]:
    return [c for c in CAPTIONS if c.isascii()] + list(TRANSLATIONS.values())


def _spm(sentences: list[str], **options) -> bytes:
    """A SentencePiece unigram model trained on sentences, serialised."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=400,
        hard_vocab_limit=False,  # a small corpus: as many pieces as it supports
        character_coverage=1.0,  # keep every Chinese character
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


def _fit(model, batches, steps: int, lr: float) -> None:
    """Fit the model to the batches (cycled) with Adam; a twin needs only to memorise its corpus."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and keeps the build deterministic
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.eval()


def build_marian(out_dir: Path, seed: int = 0) -> None:
    """A Marian translator with the opus-mt layout (source.spm, target.spm, vocab.json; pad = decoder start)."""
    import sentencepiece
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    # Opus-MT's SentencePiece models reserve no control ids of their own: </s> and <unk> come from vocab.json.
    source = _spm(list(TRANSLATIONS) + _english(), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1)
    target = _spm(_english(), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1)
    (out_dir / "source.spm").write_bytes(source)
    (out_dir / "target.spm").write_bytes(target)
    pieces = []
    for blob in (source, target):
        processor = sentencepiece.SentencePieceProcessor(model_proto=blob)
        pieces += [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = ["</s>", "<unk>"] + sorted(set(pieces) - {"<unk>"}) + ["<pad>"]  # opus-mt: eos 0, unk 1, pad last
    (out_dir / "vocab.json").write_text(json.dumps({piece: i for i, piece in enumerate(vocab)}, ensure_ascii=False))
    tokenizer = MarianTokenizer(
        str(out_dir / "source.spm"), str(out_dir / "target.spm"), str(out_dir / "vocab.json"), source_lang="zh", target_lang="en"
    )
    pad = len(vocab) - 1
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,  # Marian starts decoding from <pad>
        forced_eos_token_id=0,
        num_beams=4,  # opus-mt's generation default
        bad_words_ids=[[pad]],
    )
    seed_component(seed, "marian")
    model = MarianMTModel(config)
    batch = tokenizer(list(TRANSLATIONS), text_target=list(TRANSLATIONS.values()), padding=True, return_tensors="pt")
    batch["labels"][batch["labels"] == pad] = -100
    _fit(model, [batch], steps=150, lr=5e-3)
    model.generation_config.num_beams = 4
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _bloom_tokenizer(folder: Path, texts: list[str]):
    """A byte-level BPE tokenizer like Bloom's (unk/bos/eos/pad 0-3), merges learned in plain Python (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            words[tuple(word)] += 1
    merges = _learn_bpe_merges(words, num_merges=600)
    vocab = ["<unk>", "<s>", "</s>", "<pad>"] + list(bytes_to_unicode().values()) + [a + b for a, b in merges]
    vocab = list(dict.fromkeys(vocab))
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token=None))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "BloomTokenizerFast",  # what the real repos name; transformers 5 loads it as a fast tokenizer
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def build_bloom(out_dir: Path, seed: int = 0) -> None:
    """A Bloom causal LM that continues the BeautifulPrompt template with the prompt plus style words."""
    from transformers import BloomConfig, BloomForCausalLM

    examples = [TEMPLATE.format(prompt=p) + " " + p + STYLE for p in TRANSLATIONS.values()]
    tokenizer = _bloom_tokenizer(out_dir, examples + _english())
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seed_component(seed, "bloom")
    model = BloomForCausalLM(config)
    batch = tokenizer([e + tokenizer.eos_token for e in examples], padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    _fit(model, [batch], steps=150, lr=5e-3)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


BUILDERS = {"marian": build_marian, "bloom": build_bloom}


def ensure_text_twin(kind: str, out_dir: str | Path) -> Path:
    """out_dir holding the twin, built first if missing: in a temporary sibling, renamed into place (as
    synth.twins.ensure_twin), so a reader never sees a half-written folder and a lost race is harmless."""
    if kind not in KINDS:
        raise ValueError(f"unknown prompter twin {kind!r}; choose one of {KINDS}")

    def build(scratch: Path) -> None:
        with torch.random.fork_rng(devices=[]):  # building must not disturb the caller's random state
            BUILDERS[kind](scratch)

    return build_in_place(out_dir, "config.json", build)
