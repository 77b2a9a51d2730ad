"""Tokenizers for the offline twins, trained here on a built-in English and Chinese caption corpus.

Common words ("a", "photo", "dog") become real tokens of the CLIP, BERT and ChatGLM vocabularies rather than
byte or character fallbacks. Every trainer here is deterministic: the same corpus gives the same files.
"""

import io
import json
import string
from collections import Counter
from pathlib import Path

# English and Chinese captions; every tokenizer is trained on these.
CAPTIONS = (
    "a photo of a dog",
    "a photo of a cat",
    "a red car parked on a street",
    "a cat sitting on a windowsill",
    "a painting of a mountain lake at sunset",
    "a portrait of an old man with a beard",
    "a bowl of fruit on a wooden table",
    "a city street at night in the rain",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a small village",
    "a close up photo of a yellow flower",
    "a blue house next to a green tree",
    "a woman reading a book in a quiet library",
    "two children playing in the snow",
    "a bird flying over the ocean",
    "a plate of food with rice and vegetables",
    "a cup of coffee on a white background",
    "a forest path in autumn with orange leaves",
    "a black and white photo of an old train station",
    "a futuristic city with tall buildings, digital art",
    "a cute robot, 3d render, high quality",
    "a landscape with a river, mountains and clouds",
    "a quick brown fox jumps over the lazy dog",  # every letter, so no English word falls back to <unk>
    "a poster with the numbers 0 1 2 3 4 5 6 7 8 9",
    "一只猫坐在窗台上",
    "一只狗在草地上奔跑",
    "一辆红色的汽车停在街道上",
    "山间的湖泊与日落",
    "一位老人的肖像",
    "桌子上有一碗水果",
    "雨夜中的城市街道",
    "宇航员在月球上骑马",
    "一朵黄色的花的特写照片",
    "秋天的森林小路",
    "一杯咖啡，白色背景",
    "中国山水画，高质量",
)


def _learn_bpe_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Learns byte-pair merges by repeatedly joining the most frequent adjacent pair (Sennrich et al., 2016)."""
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Ties go to the alphabetically first pair, so every build gets the same vocabulary.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """Trains a byte-level CLIP BPE tokenizer on CAPTIONS, laid out like OpenAI's (bytes, bytes+</w>, merges, specials).

    The merges are learned in plain Python: ``tokenizers``' BpeTrainer breaks ties between equally
    frequent pairs differently from one process to the next, which would change token ids per build.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Split words with the exact normaliser and pre-tokeniser CLIPTokenizer uses.
    backend = CLIPTokenizer().backend_tokenizer
    words = Counter()
    for caption in CAPTIONS:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption)):
            words[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    merges = _learn_bpe_merges(words, num_merges=1000)

    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    vocab += [first + second for first, second in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last, as in OpenAI's vocabulary, so argmax pooling finds EOS

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # 77 tokens is CLIP's context; the OpenCLIP-G tokenizers of SDXL and SD3 pad with "!".
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=pad_token)


def _sentencepiece_model(model_type: str, **trainer_options) -> bytes:
    """Trains a SentencePiece model on CAPTIONS and returns its serialised bytes."""

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS),
        model_writer=model,
        model_type=model_type,
        vocab_size=600,
        hard_vocab_limit=False,  # the corpus is small: take as many pieces as it supports
        character_coverage=1.0,  # keep every Chinese character
        num_threads=1,
        minloglevel=2,  # quiet
        **trainer_options,
    )
    return model.getvalue()


def build_t5_tokenizer(folder: Path, model_max_length: int):
    """Trains a T5/mT5-style unigram SentencePiece tokenizer (pad 0, eos 1, unk 2, no BOS).

    On a corpus this small the unigram trainer keeps few whole words ("photo" becomes "▁p ho t o"),
    unlike BPE; T5 and mT5 are unigram models, so the twin stays one.
    """
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(_sentencepiece_model("unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    # No <extra_id_*> sentinels: they only matter for span-corruption training.
    return T5Tokenizer.from_pretrained(folder, extra_ids=0, model_max_length=model_max_length)


def build_bert_tokenizer(folder: Path):
    """Writes a WordPiece vocabulary (specials, characters incl. CJK, ##-suffixes, caption words) and loads it."""
    from transformers import BertTokenizer

    characters = set(string.ascii_lowercase + string.digits + string.punctuation)
    words = set()
    for caption in CAPTIONS:
        characters.update(char for char in caption.lower() if not char.isspace())
        words.update(word.strip(string.punctuation) for word in caption.lower().split() if word.isascii())
    suffixes = {"##" + char for char in string.ascii_lowercase + string.digits}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(characters) + sorted(suffixes)
    vocab += sorted(words - characters - {""})

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in vocab))
    # 512 is BERT's context; Hunyuan-DiT itself pads to 77.
    return BertTokenizer.from_pretrained(folder, model_max_length=512)


def build_chatglm_tokenizer(folder: Path):
    """Trains a ChatGLM3-style SentencePiece model (BPE, byte fallback, unk/bos/eos 0/1/2) for ChatGLMTokenizer."""
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "tokenizer.model"
    model_file.write_bytes(_sentencepiece_model("bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    # ChatGLMTokenizer reads its file argument itself (unlike transformers 5 tokenizers), and again on save.
    return ChatGLMTokenizer(vocab_file=str(model_file))
