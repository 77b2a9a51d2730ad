"""Prompts longer than CLIP's 77 tokens: chunked embeddings, identical to diffusers' for short prompts."""

import numpy as np
import pytest
import torch
from conftest import compose_infer, family_twins, run_cli
from PIL import Image

from synth import pipelines
from synth.families import get_family
from synth.infer import infer
from synth.prompt_encoding import emphasise, prompt_kwargs, token_chunks

WORDS = "a red car parked on a street at night in the rain"  # 11 tokens for the twins' CLIP tokenizers
LONG = ", ".join([WORDS] * 8)  # about 95 tokens: two chunks
CLIP_TWINS = family_twins(lambda family: family.clip_states_chunked)  # the families that encode with CLIP states


def pipe_for(model):
    cfg = compose_infer([f"model={model}"])
    return cfg, pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("model", CLIP_TWINS)
@pytest.mark.parametrize("negative", ["", "blurry, ugly"])
def test_short_prompt_embeddings_equal_diffusers(model, negative):
    cfg, pipe = pipe_for(model)
    family = cfg.model.family
    ours = prompt_kwargs(pipe, get_family(family), WORDS, negative, 7.0, cfg.model)
    extra = {"sd15": {}, "sdxl": {"prompt_2": None}, "sd3": {"prompt_2": None, "prompt_3": None}}[family]
    with torch.no_grad():  # as inside the pipeline call
        reference = pipe.encode_prompt(
            prompt=WORDS, negative_prompt=negative or None, device="cpu", num_images_per_prompt=1,
            do_classifier_free_guidance=True, **extra,
        )
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    for name, expected in zip(names, reference):
        if expected is not None:
            assert torch.equal(ours[name], expected), name


@pytest.mark.parametrize("model", CLIP_TWINS)
def test_long_prompt_is_chunked_and_negative_padded(model):
    cfg, pipe = pipe_for(model)
    tokenizer = pipe.tokenizer
    assert len(token_chunks(tokenizer, LONG)) == 2
    ours = prompt_kwargs(pipe, get_family(cfg.model.family), LONG, "blurry", 7.0, cfg.model)
    t5 = cfg.model.max_sequence_length if cfg.model.family == "sd3" else 0
    assert ours["prompt_embeds"].shape[1] == 2 * 77 + t5
    assert ours["negative_prompt_embeds"].shape == ours["prompt_embeds"].shape, "negative padded to as many chunks"
    # The first chunk is exactly the embedding of the prompt's first 75 tokens.
    head = tokenizer.decode(token_chunks(tokenizer, LONG)[0])
    first = prompt_kwargs(pipe, get_family(cfg.model.family), head, "blurry", 7.0, cfg.model)["prompt_embeds"]
    assert torch.allclose(ours["prompt_embeds"][:, :77], first[:, :77], atol=1e-6)
    # A long negative prompt pads the positive one.
    swapped = prompt_kwargs(pipe, get_family(cfg.model.family), "blurry", LONG, 7.0, cfg.model)
    assert swapped["prompt_embeds"].shape == ours["prompt_embeds"].shape


def test_tokens_past_77_change_the_image(tmp_path):
    tail_a, tail_b = LONG + ", a yellow flower", LONG + ", a black and white photo"
    assert len(token_chunks(pipe_for("tiny_sd15")[1].tokenizer, LONG)) == 2  # both tails sit in the second chunk
    images = []
    for name, prompt in (("a", tail_a), ("b", tail_b)):
        [path] = infer(compose_infer(["model=tiny_sd15", f"prompt='{prompt}'"], output_dir=tmp_path / name))
        images.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.int16))
    assert np.abs(images[0] - images[1]).mean() > 0.5, "the words after token 77 were ignored"


def test_sd3_t5_length_is_config():
    cfg, pipe = pipe_for("tiny_sd3")
    cfg.model.max_sequence_length = 128
    ours = prompt_kwargs(pipe, get_family("sd3"), WORDS, "", 7.0, cfg.model)
    assert ours["prompt_embeds"].shape[1] == 77 + 128


@pytest.mark.parametrize("args, message", [
    (["model=tiny_kolors", "model.max_sequence_length=300"], "kolors takes 1..256 tokens"),
    (["model=tiny_sd3", "model.max_sequence_length=600"], "sd3 takes 1..512 tokens"),
])
def test_sequence_length_checks(tmp_path, args, message):
    result = run_cli("infer.py", *args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sd3"])
def test_prompt_weighting(model):
    cfg, pipe = pipe_for(model)
    family = cfg.model.family

    def embeds(prompt):
        return prompt_kwargs(pipe, get_family(family), prompt, "", 7.0, cfg.model)["prompt_embeds"]

    plain = embeds("a red car on a street")
    assert torch.equal(embeds("a (red car:1.0) on a street"), plain), "weight 1 is the plain prompt"
    weighted = embeds("a (red car:1.5) on a street")
    assert torch.isfinite(weighted).all()
    assert not torch.allclose(weighted[:, :77], plain[:, :77]), "the weight changes the CLIP states"
    # The mean is restored where it is well defined (the SD3 twin's CLIP states), and left alone where it is
    # numerically zero (the SD1.5 twin's layer-normed states): either way it stays what it was, to float32.
    assert torch.allclose(weighted[:, :77].double().mean(), plain[:, :77].double().mean(), atol=1e-6)
    if family == "sd3":
        assert torch.equal(weighted[:, 77:], plain[:, 77:]), "T5 reads the text without the syntax"
    assert embeds("a (red car) on a street").shape == plain.shape  # plain parentheses stay text


def reference_emphasis(states, scale):
    """A1111's formula, written out for one chunk: z * w, then * (old mean / new mean)."""
    weighted = states.double() * scale[..., None]
    return weighted * (states.double().mean() / weighted.mean())


@pytest.mark.parametrize("offset", [0.5, -0.5])
def test_emphasis_matches_a1111_where_defined(offset):
    states = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0)) + offset
    scale = torch.ones(1, 77, dtype=torch.float64)
    scale[0, 3:6] = 1.4
    ours = emphasise(states, scale)
    assert torch.allclose(ours.double(), reference_emphasis(states, scale), atol=1e-6)
    assert abs(ours.double().mean() - states.double().mean()) < 1e-6


@pytest.mark.parametrize("case", ["zero_mean", "sign_flip", "tiny_mean"])
def test_emphasis_never_blows_up(case):
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(2, 77, 32, generator=generator)
    scale = torch.ones(2, 77, dtype=torch.float64)
    scale[:, 1:10] = 1.5
    if case == "zero_mean":
        states = states - states.mean(dim=(1, 2), keepdim=True)  # what a layer norm without bias gives
    elif case == "tiny_mean":
        states = states - states.mean(dim=(1, 2), keepdim=True) + 1e-9
    else:  # the weighted tokens carry the mean: weighting them flips its sign
        states = torch.full((2, 77, 32), 0.01)
        states[:, 1:10] = -0.05
        scale[:, 1:10] = 3.0
    ours = emphasise(states, scale)
    assert torch.isfinite(ours).all()
    # Unguarded, A1111's ratio would explode or flip every state; synth keeps the plain weighted states.
    assert torch.allclose(ours.double(), states.double() * scale[..., None], atol=1e-6)


def test_emphasis_is_per_chunk():
    """Each 77-token chunk keeps its own mean, as in A1111, where chunks are encoded one at a time."""
    states = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2)) + torch.tensor([0.3, 0.8])[:, None, None]
    scale = torch.ones(2, 77, dtype=torch.float64)
    scale[1, 5:9] = 0.7
    ours = emphasise(states, scale)
    assert torch.equal(ours[0], states[0]), "an unweighted chunk is untouched"
    assert torch.allclose(ours[1].double(), reference_emphasis(states[1:], scale[1:])[0], atol=1e-6)


def test_weighted_prompt_gives_a_real_image(tmp_path):
    """`a (red car:1.4) on a street` once gave inf embeddings and a black image on tiny_sd15."""
    [path] = infer(compose_infer(["model=tiny_sd15", "prompt='a (red car:1.4) on a street'"], output_dir=tmp_path))
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 1.0 and 1.0 < pixels.mean() < 254.0, "a flat (black) image"
