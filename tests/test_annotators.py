"""The lineart annotator: the twin loads through the real loader, draws input-dependent maps, and bad files are refused."""

import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from synth.annotators import (
    LineartAnnotator,
    LineartGenerator,
    build_lineart_twin,
    ensure_lineart_twin,
    work_size,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Keys and shapes of the real ControlNet 1.1 sk_model.pth (informative drawings Generator(3, 1, 3), width 64).
REAL_SHAPES = {
    "model0.1.weight": (64, 3, 7, 7),
    "model1.0.weight": (128, 64, 3, 3),
    "model1.3.weight": (256, 128, 3, 3),
    **{f"model2.{i}.conv_block.{j}.weight": (256, 256, 3, 3) for i in range(3) for j in (1, 5)},
    "model3.0.weight": (256, 128, 3, 3),  # ConvTranspose2d weights are (in, out, k, k)
    "model3.3.weight": (128, 64, 3, 3),
    "model4.1.weight": (1, 64, 7, 7),
}


def textured(seed: int, size=(96, 64)) -> Image.Image:
    """A seeded RGB image with edges and noise, so the generator has structure to draw."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return ensure_lineart_twin(tmp_path_factory.mktemp("annotators") / "lineart")


def test_twin_files_are_plain_state_dicts_with_the_real_key_layout(twin):
    assert sorted(path.name for path in twin.iterdir()) == ["sk_model.pth", "sk_model2.pth"]
    state_dict = torch.load(twin / "sk_model.pth", map_location="cpu", weights_only=True)
    one_block = [name for name in REAL_SHAPES if not name.startswith(("model2.1.", "model2.2."))]
    assert set(state_dict) == {name[: -len("weight")] + kind for name in one_block for kind in ("weight", "bias")}
    real = LineartGenerator().state_dict()
    assert {name: tuple(real[name].shape) for name in REAL_SHAPES} == REAL_SHAPES
    assert len(real) == 2 * len(REAL_SHAPES)  # instance norms hold no parameters or buffers


@pytest.mark.parametrize("coarse", [False, True])
def test_twin_loads_and_draws_an_input_dependent_rgb_map(twin, coarse):
    annotator = LineartAnnotator.from_pretrained(str(twin), coarse=coarse)
    image = textured(0)
    condition = annotator(image, detect_resolution=64)
    assert condition.mode == "RGB" and condition.size == image.size
    pixels = np.asarray(condition)
    assert pixels.std() > 2  # not a constant image
    assert np.isin(pixels, (0, 255)).mean() < 0.5  # the sigmoid is not saturated
    assert np.array_equal(pixels, np.asarray(annotator(image, detect_resolution=64)))  # deterministic
    assert not np.array_equal(pixels, np.asarray(annotator(textured(1), detect_resolution=64)))


def test_coarse_and_realistic_twins_differ_and_rebuild_identically(twin, tmp_path):
    image = textured(2)
    realistic = np.asarray(LineartAnnotator.from_pretrained(twin)(image, detect_resolution=64))
    coarse = np.asarray(LineartAnnotator.from_pretrained(twin, coarse=True)(image, detect_resolution=64))
    assert not np.array_equal(realistic, coarse)
    rebuilt = build_lineart_twin(tmp_path / "again")
    assert (rebuilt / "sk_model.pth").read_bytes() == (twin / "sk_model.pth").read_bytes()


def test_loader_infers_width_and_blocks(tmp_path):
    wide = LineartAnnotator.from_pretrained(build_lineart_twin(tmp_path / "wide", seed=3, base_width=4, blocks=2))
    assert wide.generator.model0[1].out_channels == 4 and len(wide.generator.model2) == 2
    assert wide(textured(0), detect_resolution=64).size == (96, 64)
    # A file shaped like the real sk_model.pth (17 MB, width 64, 3 blocks) loads through the same code.
    real_shaped = tmp_path / "real_shaped"
    real_shaped.mkdir()
    torch.save(LineartGenerator(64, 3).state_dict(), real_shaped / "sk_model.pth")
    annotator = LineartAnnotator.from_pretrained(real_shaped)
    assert annotator.generator.model0[1].out_channels == 64 and len(annotator.generator.model2) == 3


def test_detect_resolution_sets_the_work_size(twin):
    annotator = LineartAnnotator.from_pretrained(twin)
    seen = []
    annotator.generator.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    image = textured(0, size=(200, 100))
    for detect_resolution in (64, 128):
        assert annotator(image, detect_resolution=detect_resolution).size == (200, 100)
    assert seen == [(1, 3, 64, 128), (1, 3, 128, 256)]
    assert work_size((1000, 750), 512) == (704, 512)  # 682.7 rounds to the nearest multiple of 64


def test_bad_detect_resolution_is_refused(twin):
    with pytest.raises(ValueError, match="detect_resolution=32"):
        LineartAnnotator.from_pretrained(twin)(textured(0), detect_resolution=32)


def test_other_architectures_are_refused_naming_the_file(tmp_path):
    cases = {
        "random": {"weight": torch.randn(3, 3)},
        "not_a_dict": [torch.randn(2)],
        "extra_key": {**LineartGenerator(4, 1).state_dict(), "model5.0.weight": torch.randn(1)},
        "wrong_output": {**LineartGenerator(4, 1).state_dict(), "model4.1.weight": torch.randn(3, 4, 7, 7)},
    }
    for name, contents in cases.items():
        (tmp_path / name).mkdir()
        torch.save(contents, tmp_path / name / "sk_model.pth")
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name / "sk_model.pth"))):
            LineartAnnotator.from_pretrained(tmp_path / name)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "sk_model.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt/sk_model.pth"):
        LineartAnnotator.from_pretrained(tmp_path / "corrupt")


def test_missing_files_and_offline_hub_ids_raise_file_not_found(tmp_path, twin):
    (tmp_path / "only_realistic").mkdir()
    (tmp_path / "only_realistic" / "sk_model.pth").write_bytes((twin / "sk_model.pth").read_bytes())
    with pytest.raises(FileNotFoundError, match="has no sk_model2.pth"):
        LineartAnnotator.from_pretrained(tmp_path / "only_realistic", coarse=True)
    with pytest.raises(ValueError, match="neither an existing local folder nor a hub id"):
        LineartAnnotator.from_pretrained(str(tmp_path / "no_such_folder"))
    # conftest sets HF_HUB_OFFLINE=1: an uncached hub file fails at once, naming the repo and how to get it.
    with pytest.raises(FileNotFoundError, match="lllyasviel/Annotators.*sk_model.pth.*not available offline"):
        LineartAnnotator.from_pretrained("lllyasviel/Annotators")


class CodeRunningPickle:
    """Unpickling this would create `marker`: what a malicious .pth could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    (tmp_path / "evil").mkdir()
    torch.save({"model0.1.weight": CodeRunningPickle(marker)}, tmp_path / "evil" / "sk_model.pth")
    with open(tmp_path / "evil" / "sk_model2.pth", "wb") as file:
        pickle.dump(CodeRunningPickle(marker), file, protocol=2)  # torch.load warns about newer protocols
    for coarse in (False, True):
        with pytest.raises(ValueError, match="not a readable weights-only torch file"):
            LineartAnnotator.from_pretrained(tmp_path / "evil", coarse=coarse)
    assert not marker.exists()
    # The payload is real: a plain unpickle would have run it.
    pickle.loads(pickle.dumps(CodeRunningPickle(marker)))
    assert marker.is_dir()
