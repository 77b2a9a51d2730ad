"""The tiler as plain functions (coverage, weights, exactness, seams) and the tiled denoiser on every family's twin."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from synth.families import FAMILIES
from synth.tiling import Tile, area_overhead, blend_weights, tile_layout, tiled_apply

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# Latent sides of the awkward pixel sizes the issue names (1000, 1016, 1600, 2040 px -> /8), and small ones.
AWKWARD = [125, 127, 200, 255, 64, 65, 9]


def sizes(align):
    return st.integers(1, 64).map(lambda n: n * align) | st.sampled_from([s for s in AWKWARD if s % align == 0])


@st.composite
def layouts(draw):
    align = draw(st.sampled_from([1, 2]))
    height, width = draw(sizes(align)), draw(sizes(align))
    tile = draw(st.integers(2, 32)) * 4  # a multiple of every alignment
    overlap = draw(st.integers(0, tile - 1))
    return height, width, tile, overlap, align


def coverage(tiles, height, width):
    count = torch.zeros(height, width, dtype=torch.int64)
    for tile in tiles:
        count[tile.slices()] += 1
    return count


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_tiles_cover_every_pixel_and_stay_inside(layout):
    height, width, tile, overlap, align = layout
    tiles = tile_layout(height, width, tile, overlap, align)
    assert coverage(tiles, height, width).min() >= 1
    for t in tiles:
        assert 0 <= t.top and t.top + t.height <= height and 0 <= t.left and t.left + t.width <= width
        assert (t.height, t.width) == (min(tile, height), min(tile, width))  # every tile the same size
        assert t.top % align == 0 and t.left % align == 0


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_blend_weights_sum_to_one_everywhere(layout):
    height, width, tile, overlap, align = layout
    tiles = tile_layout(height, width, tile, overlap, align)
    total = torch.zeros(height, width, dtype=torch.float64)
    for t, weight in zip(tiles, blend_weights(tiles, height, width, overlap)):
        assert (weight > 0).all()
        total[t.slices()] += weight
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(layouts(), st.sampled_from(["identity", "linear"]), st.integers(1, 5))
def test_pointwise_denoiser_tiled_equals_untiled(layout, kind, batch_size):
    height, width, tile, overlap, align = layout
    generator = torch.Generator().manual_seed(height * 1000 + width)
    x = torch.randn(2, 4, height, width, generator=generator)
    weight = torch.randn(8, 4, 1, 1, generator=generator)

    def denoiser(_tiles, crops):
        return crops.clone() if kind == "identity" else F.conv2d(crops, weight) * 0.5 + 0.25

    tiles = tile_layout(height, width, tile, overlap, align)
    tiled = tiled_apply(denoiser, x, tiles, overlap, batch_size)
    torch.testing.assert_close(tiled, denoiser(None, x), rtol=1e-6, atol=1e-6)


def test_one_tile_at_least_the_latent_is_bitwise_untiled():
    x = torch.randn(2, 4, 40, 56)

    def blur(_tiles, crops):
        return F.avg_pool2d(crops, 3, 1, 1) * 1.7

    for tile in (56, 64, 200):
        tiles = tile_layout(40, 56, tile, 8)
        assert len(tiles) == 1
        assert torch.equal(tiled_apply(blur, x, tiles, 8, 4), blur(None, x))


def test_batched_and_unbatched_tiles_are_identical():
    x = torch.randn(2, 4, 77, 93)

    def per_sample(_tiles, crops):  # row by row, so the result cannot depend on how many tiles are batched
        return torch.cat([F.avg_pool2d(row[None], 3, 1, 1) for row in crops])

    tiles = tile_layout(77, 93, 24, 6)
    one = tiled_apply(per_sample, x, tiles, 6, 1)
    for batch_size in (2, 3, len(tiles)):
        assert torch.equal(tiled_apply(per_sample, x, tiles, 6, batch_size), one)


def seam_ratio(image: torch.Tensor, cuts: list[int], axis: int) -> float:
    """Mean |gradient| across the tile-edge rows (axis 0) or columns (axis 1) / the median over all of them.

    The first and last 3 rows/columns are left out: the blur's own zero padding darkens the image border.
    """
    gradient = image.diff(dim=axis).abs().mean(dim=1 - axis)[3:-3]
    return (gradient[[c - 1 - 3 for c in cuts]].mean() / gradient.median()).item()


@pytest.mark.parametrize("height, width, tile, overlap", [(125, 255, 32, 8), (200, 127, 48, 12), (96, 96, 16, 4)])
def test_seams_stay_within_ten_percent_of_untiled(height, width, tile, overlap):
    rows = torch.linspace(0, 3, height)[:, None]
    columns = torch.linspace(0, 5, width)[None, :]
    smooth = (torch.sin(rows) * torch.cos(columns) + 0.3 * rows + 2)[None, None]

    def blur(_tiles, crops):  # sees less context at a tile's border than inside: the classic seam source
        return F.avg_pool2d(F.pad(crops, (2, 2, 2, 2), mode="replicate"), 5, 1)

    tiles = tile_layout(height, width, tile, overlap)
    tiled = tiled_apply(blur, smooth, tiles, overlap, 4)[0, 0]
    untiled = blur(None, smooth)[0, 0]
    for axis in (0, 1):
        length = (height, width)[axis]
        edges = {t.top if axis == 0 else t.left for t in tiles}
        edges |= {t.top + t.height if axis == 0 else t.left + t.width for t in tiles}
        cuts = sorted(c for c in edges if 4 < c < length - 4)
        if cuts:
            assert seam_ratio(tiled, cuts, axis) <= 1.10 * seam_ratio(untiled, cuts, axis)


def test_area_overhead_at_4096_defaults():
    # 4096 px: latent 512; SD1.5 tiles 64 with overlap 8, SDXL-class tiles 128 with overlap 16
    assert area_overhead(tile_layout(512, 512, 64, 8), 512, 512) <= 1.6
    assert area_overhead(tile_layout(512, 512, 128, 16), 512, 512) <= 1.6


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap 16 must be in"):
        tile_layout(100, 100, 16, 16)


# --- the tiled denoiser on the twins ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes():
    from synth import twins
    from synth.config import cache_dir
    from synth.families import get_family

    loaded = {}
    for family in FAMILIES:
        folder = twins.ensure_twin(family, os.path.join(cache_dir(), "twins", "v1", f"{family}-tiny"))
        pipe = get_family(family).pipeline_class("text2img").from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        loaded[family] = pipe
    return loaded


def run_pipe(pipe, family, size, settings=None, stats=None):
    from synth.families import get_family
    from synth.tiled_denoiser import tiled_denoiser

    call = dict(prompt="a cat", num_inference_steps=2, output_type="latent",
                **get_family(family).call_kwargs({}, "text2img", size, size))
    generator = torch.Generator().manual_seed(0)
    if settings is None:
        return pipe(**call, generator=generator).images
    with tiled_denoiser(pipe, settings, stats, forward=get_family(family).tiled_forward_function()):
        return pipe(**call, generator=generator).images


@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_denoiser_every_family(pipes, family):
    from synth.families import get_family
    from synth.tiled_denoiser import TileSettings

    align = get_family(family).tile_align
    untiled = run_pipe(pipes[family], family, 96)
    # a tile at least as big as the latent: bitwise the untiled pipeline
    assert torch.equal(run_pipe(pipes[family], family, 96, TileSettings(16, 4, 4, align)), untiled)
    stats = {}
    tiled = run_pipe(pipes[family], family, 96, TileSettings(8, 2, 4, align), stats)
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    assert not torch.equal(tiled, untiled)
    assert stats["tiles"] == stats["steps"] * len(tile_layout(12, 12, 8, 2, align))
    # batching tiles changes only float rounding (CPU matmul blocking depends on the batch)
    one = run_pipe(pipes[family], family, 96, TileSettings(8, 2, 1, align))
    torch.testing.assert_close(one, tiled, rtol=1e-3, atol=1e-3 * tiled.abs().max().item())
    # the denoiser is back to normal afterwards
    from synth.tiled_denoiser import denoiser_of

    assert "forward" not in denoiser_of(pipes[family]).__dict__


def test_sdxl_tiles_get_their_crop_of_the_full_image(pipes):
    from synth.tiled_denoiser import TileSettings, tiled_denoiser, unet_forward

    pipe = pipes["sdxl"]
    seen = []
    original = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return original(*args, **kwargs)

    pipe.unet.forward = spy
    try:
        with tiled_denoiser(pipe, TileSettings(8, 2, 16), forward=unet_forward):
            pipe(prompt="a", num_inference_steps=1, width=96, height=96, guidance_scale=1.0, output_type="latent")
    finally:
        del pipe.unet.forward
    tiles = tile_layout(12, 12, 8, 2)
    expected = torch.tensor([[96, 96, t.top * 8, t.left * 8, 64, 64] for t in tiles], dtype=seen[0].dtype)
    assert torch.equal(seen[0], expected)


def test_sd3_above_its_positional_limit_runs_tiled(pipes):
    from synth.families import get_family
    from synth.tiled_denoiser import TileSettings, tiled_denoiser

    sd3 = get_family("sd3")
    transformer = pipes["sd3"].transformer
    limit = sd3.untiled_limit(pipes["sd3"])
    x = torch.randn(2, 16, limit + 16, limit + 16)
    embeds, pooled = torch.randn(2, 7, transformer.config.joint_attention_dim), torch.randn(2, transformer.config.pooled_projection_dim)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        transformer(x, embeds, pooled, torch.tensor([500.0, 500.0]))
    with torch.no_grad(), tiled_denoiser(pipes["sd3"], TileSettings(limit * 4, 16, 4, 2), forward=sd3.tiled_forward_function()):  # capped to the limit
        out = transformer(x, embeds, pooled, torch.tensor([500.0, 500.0]), return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_tile_dataclass_slices():
    assert Tile(2, 3, 4, 5).slices() == (slice(2, 6), slice(3, 8))
