"""Textual inversion on the twins: file formats, keywords, SD3 with SD1.x embeddings, safe loading, CLI checks."""

import pickle

import numpy as np
import pytest
import torch
from conftest import compose_infer, run_cli
from PIL import Image
from safetensors.torch import save_file

from synth import pipelines
from synth.infer import infer
from synth.textual_inversion import expand, parse, read_embeddings, read_file

CLIP_L, CLIP_G = 32, 64  # the tiny twins' CLIP-L and CLIP-G widths (768 and 1280 in the real models)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def generate(tmp_path, *overrides):
    [path] = infer(compose_infer(list(overrides), output_dir=tmp_path))
    return pixels(path)


def vectors(count, width, seed):
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    torch.save({"string_to_param": {"*": vectors(3, CLIP_L, 1)}, "name": "old", "step": 100}, folder / "badhands.pt")
    save_file({"emb_params": vectors(2, CLIP_L, 2)}, folder / "mystyle.safetensors")
    torch.save({"<cat-toy>": vectors(1, CLIP_L, 3)[0]}, folder / "learned_embeds.bin")
    save_file({"clip_l": vectors(2, CLIP_L, 4), "clip_g": vectors(2, CLIP_G, 5)}, folder / "xlstyle.safetensors")
    save_file({"emb_params": vectors(1, 48, 6)}, folder / "wide.safetensors")
    return folder


def test_formats_and_keywords(files):
    a1111 = parse(files / "badhands.pt", read_file(files / "badhands.pt"))
    assert a1111.keyword == "badhands" and a1111.vectors["clip_l"].shape == (3, CLIP_L)  # the stem, not "old"
    assert parse(files / "mystyle.safetensors", read_file(files / "mystyle.safetensors")).vectors["clip_l"].shape == (2, CLIP_L)
    diffusers = parse(files / "learned_embeds.bin", read_file(files / "learned_embeds.bin"))
    assert diffusers.keyword == "<cat-toy>" and diffusers.vectors["clip_l"].shape == (1, CLIP_L)  # the stored token
    sdxl = parse(files / "xlstyle.safetensors", read_file(files / "xlstyle.safetensors"))
    assert set(sdxl.vectors) == {"clip_l", "clip_g"}
    cfg = compose_infer([f"textual_inversion=[{files}]"])  # a folder: every embedding file in it
    assert sorted(e.keyword for e in read_embeddings(cfg)) == ["<cat-toy>", "badhands", "mystyle", "wide", "xlstyle"]


def test_keyword_changes_output_and_absent_keyword_changes_nothing(tmp_path, files):
    base = ["model=tiny_sd15", "prompt=a red car", "negative_prompt=blurry"]
    embeddings = f"textual_inversion=[{files / 'badhands.pt'},{files / 'learned_embeds.bin'}]"
    plain = generate(tmp_path / "a", *base)
    loaded = generate(tmp_path / "b", *base, embeddings)
    assert np.array_equal(plain, loaded), "without its keyword an embedding must change nothing"
    negative = generate(tmp_path / "c", *base[:2], "negative_prompt='blurry, badhands'", embeddings)
    assert np.abs(plain - negative).mean() > 1, "the keyword works in the negative prompt"
    positive = generate(tmp_path / "d", "model=tiny_sd15", "prompt='a red <cat-toy> car'", "negative_prompt=blurry", embeddings)
    without = generate(tmp_path / "e", "model=tiny_sd15", "prompt='a red <cat-toy> car'", "negative_prompt=blurry")
    assert np.abs(positive - without).mean() > 1, "the keyword works in the prompt"


def test_multi_vector_keyword_expands_to_all_tokens(files):
    cfg = compose_infer(["model=tiny_sd15", f"textual_inversion=[{files / 'badhands.pt'}]"])
    pipe = pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)
    assert expand("a badhands, photo", pipe.tokenizer) == "a badhands badhands_1 badhands_2, photo"
    assert expand("a badhandsome photo", pipe.tokenizer) == "a badhandsome photo", "whole words only"
    assert expand("a BadHands photo", pipe.tokenizer) == "a badhands badhands_1 badhands_2 photo", "CLIP lowercases"
    ids = pipe.tokenizer(expand("badhands", pipe.tokenizer)).input_ids
    embedding = pipe.text_encoder.get_input_embeddings().weight[ids[1:4]]
    assert torch.equal(embedding, read_embeddings(cfg)[0].vectors["clip_l"])


def test_sd3_takes_an_sd15_embedding_in_its_clip_l_encoder(tmp_path, files):
    base = ["model=tiny_sd3", "prompt=a red car"]
    embeddings = f"textual_inversion=[{files / 'badhands.pt'}]"
    plain = generate(tmp_path / "a", *base, "negative_prompt=blurry")
    assert np.array_equal(plain, generate(tmp_path / "b", *base, "negative_prompt=blurry", embeddings))
    negative = generate(tmp_path / "c", *base, "negative_prompt='blurry, badhands'", embeddings)
    assert np.abs(plain - negative).mean() > 1
    pipe = pipelines.get_pipeline(compose_infer([*base, embeddings]), torch.device("cpu"), torch.float32)
    assert "badhands_2" in pipe.tokenizer.get_vocab() and "badhands" not in pipe.tokenizer_2.get_vocab()


def test_sdxl_takes_clip_l_and_clip_g(tmp_path, files):
    base = ["model=tiny_sdxl", "prompt=a red car", "negative_prompt=blurry"]
    embeddings = f"textual_inversion=[{files / 'xlstyle.safetensors'}]"
    plain = generate(tmp_path / "a", *base)
    assert np.array_equal(plain, generate(tmp_path / "b", *base, embeddings))
    styled = generate(tmp_path / "c", "model=tiny_sdxl", "prompt='a red car, xlstyle'", "negative_prompt=blurry", embeddings)
    assert np.abs(plain - generate(tmp_path / "d", "model=tiny_sdxl", "prompt='a red car, xlstyle'", "negative_prompt=blurry")).mean() > 0.5
    assert styled.shape == plain.shape


def test_width_mismatch_names_both_widths(tmp_path, files):
    with pytest.raises(ValueError, match=r"width 48 .* width 32"):
        infer(compose_infer(["model=tiny_sd15", f"textual_inversion=[{files / 'wide.safetensors'}]"], output_dir=tmp_path))
    with pytest.raises(ValueError, match="clip_l and clip_g"):
        infer(compose_infer(["model=tiny_sdxl", f"textual_inversion=[{files / 'badhands.pt'}]"], output_dir=tmp_path))


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    # The payload is real: unpickling a copy of it unsafely creates its marker.
    proof = tmp_path / "proof-marker"
    pickle.loads(pickle.dumps({"string_to_param": {"*": Payload(proof)}}))
    assert proof.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload(marker)}, "name": "evil"}, evil)
    result = run_cli("infer.py", "model=tiny_sd15", f"textual_inversion=[{evil}]", f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    assert "refused" in result.stderr and "evil.pt" in result.stderr
    assert not marker.exists(), "the payload ran"
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=tiny_sd15", "textual_inversion=[/nonexistent/neg.pt]"], "no such file or folder"),
        (["model=tiny_kolors", "textual_inversion=[{files}/badhands.pt]"], "kolors has no CLIP text encoder"),
        (["model=tiny_sd15", "textual_inversion=[{files}/../notes.txt]"], "unsupported file type"),
    ],
)
def test_cli_input_checks(tmp_path, files, args, message):
    (files.parent / "notes.txt").write_text("not an embedding")
    args = [a.replace("{files}", str(files)) for a in args]
    result = run_cli("infer.py", *args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
