"""Overlapping tiles over a latent, smooth blend weights, and a tiled call of any per-tile function.

MultiDiffusion-style tiling (Bar-Tal et al., 2023, "MultiDiffusion: Fusing Diffusion Paths"): run a function on
overlapping windows and average the results with weights. Everything here is plain torch on (batch, channels,
height, width) tensors; synth/tiled_denoiser.py adapts it to each family's denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """A window of the latent: rows top..top+height, columns left..left+width (latent pixels)."""

    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size `tile` covering 0..length with at least ~`overlap` shared pixels.

    The tiles are spread evenly, so the last one ends exactly at `length` (no holes, no partial tile) and
    every tile has the same size. Starts are multiples of `align` (a DiT's patch size), which needs
    `length` and `tile` to be multiples of `align`.
    """
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile size {tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    span = length - tile
    starts = [(round(i * span / (count - 1)) // align) * align for i in range(count)]
    starts[-1] = span  # exact, even when span / (count - 1) is not an integer
    return sorted(set(starts))


def tile_layout(height: int, width: int, tile_size: int, tile_overlap: int, align: int = 1) -> list[Tile]:
    """Tiles covering a height x width latent; a side no longer than tile_size is one tile of that side."""
    tile_height, tile_width = min(tile_size, height), min(tile_size, width)
    return [
        Tile(top, left, tile_height, tile_width)
        for top in tile_starts(height, tile_size, tile_overlap, align)
        for left in tile_starts(width, tile_size, tile_overlap, align)
    ]


def edge_ramp(start: int, size: int, length: int, ramp: int) -> torch.Tensor:
    """1-D weight of a tile: 1 inside, falling as a half cosine over `ramp` pixels at an edge shared with a neighbour.

    The cosine reaches the edge with zero slope and nearly zero weight (pixel centres sit half a pixel in,
    so weights never reach 0 and the normalised blend is defined everywhere): a tile's own edge artefacts,
    where its denoiser saw no context, barely enter the blend. An edge on the image border keeps weight 1,
    so a pixel covered by one tile gets exactly that tile's value.
    """
    position = torch.arange(size, dtype=torch.float64) + 0.5
    distance = torch.full((size,), float("inf"), dtype=torch.float64)
    if start > 0:
        distance = torch.minimum(distance, position)
    if start + size < length:
        distance = torch.minimum(distance, size - position)
    return torch.sin(torch.pi / 2 * (distance / max(ramp, 1)).clamp(max=1)) ** 2


def blend_totals(tiles: list[Tile], height: int, width: int, ramp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blend's normaliser: the sums of the tiles' edge ramps down the rows (height,) and across the columns (width,).

    The tiles must form a grid, every pair of a row band and a column band, as tile_layout makes them. A tile's
    weight is the outer product of its two ramps, so the sum of all weights at a pixel is
    row_total[row] * column_total[column]: normalising needs two float64 vectors, not a latent-sized map.
    """
    bands = sorted({(tile.top, tile.height) for tile in tiles})
    columns = sorted({(tile.left, tile.width) for tile in tiles})
    grid = {Tile(top, left, tile_height, tile_width) for top, tile_height in bands for left, tile_width in columns}
    if len(tiles) != len(grid) or set(tiles) != grid:
        raise ValueError(
            f"{len(tiles)} tiles are not a grid of {len(bands)} row bands x {len(columns)} column bands, "
            "each pair once (as tile_layout makes them)"
        )
    row_total = torch.zeros(height, dtype=torch.float64)
    for top, tile_height in bands:
        row_total[top : top + tile_height] += edge_ramp(top, tile_height, height, ramp)
    column_total = torch.zeros(width, dtype=torch.float64)
    for left, tile_width in columns:
        column_total[left : left + tile_width] += edge_ramp(left, tile_width, width, ramp)
    if (row_total == 0).any() or (column_total == 0).any():
        raise ValueError(f"tiles leave latent pixels uncovered for a {height}x{width} latent")
    return row_total, column_total


def blend_weight(
    tile: Tile, height: int, width: int, ramp: int, totals: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The tile's (tile.height, tile.width) float64 weight, normalised by blend_totals: all tiles sum to 1 everywhere."""
    row_total, column_total = totals
    rows = edge_ramp(tile.top, tile.height, height, ramp) / row_total[tile.top : tile.top + tile.height]
    columns = edge_ramp(tile.left, tile.width, width, ramp) / column_total[tile.left : tile.left + tile.width]
    return rows[:, None] * columns[None, :]


def blend_weights(tiles: list[Tile], height: int, width: int, ramp: int) -> list[torch.Tensor]:
    """Per-tile weights normalised so that they sum to 1 at every latent pixel (float64)."""
    totals = blend_totals(tiles, height, width, ramp)
    return [blend_weight(tile, height, width, ramp, totals) for tile in tiles]


def tiled_apply(
    fn: Callable[[list[Tile], torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tiles: list[Tile],
    ramp: int,
    batch_size: int,
    pad_last_batch: bool = False,
) -> torch.Tensor:
    """Blend fn over tiles of x (B, C, H, W); fn(tiles, crops) gets k tiles stacked tile-major as (k*B, C, h, w).

    fn must return (k*B, C', h, w) in the same order. One tile covering x is a plain fn call (bitwise untiled).
    pad_last_batch (a compiled denoiser, whose graphs are specialised to the batch size): a last batch of fewer
    than batch_size tiles is filled up with copies of its last tile and their predictions dropped, so every call
    has one shape and the ragged batch does not compile a graph of its own; it costs the padded tiles' compute,
    which is why it is not always on.
    Predictions are accumulated in float64 (float32 on MPS, which has no float64) and returned in fn's dtype:
    the blend adds no rounding of its own beyond the final cast. Besides fn's own memory, the blend holds the
    accumulator (B x C' x H x W, 8 bytes each; the returned prediction beside it at the end), one batch of tiles
    (crops, weights, weighted predictions) and two normalising vectors: each tile's weight is made when it is
    added, so no latent-sized weight map exists.
    """
    if len(tiles) == 1 and (tiles[0].height, tiles[0].width) == tuple(x.shape[-2:]):
        return fn(tiles, x)
    height, width = x.shape[-2:]
    totals = blend_totals(tiles, height, width, ramp)
    accumulate = torch.float32 if x.device.type == "mps" else torch.float64
    out = None
    for first in range(0, len(tiles), batch_size):
        batch = tiles[first : first + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch)) if pad_last_batch else batch
        crops = torch.cat([x[(..., *tile.slices())] for tile in padded])
        pred = fn(padded, crops)
        if len(padded) > len(batch):
            pred = pred[: len(batch) * x.shape[0]]  # tile-major: the real tiles come first
        if out is None:
            out = torch.zeros((x.shape[0], pred.shape[1], height, width), dtype=accumulate, device=pred.device)
            out_dtype = pred.dtype
        for tile, tile_pred in zip(batch, pred.chunk(len(batch))):
            weight = blend_weight(tile, height, width, ramp, totals).to(out.device, accumulate)
            out[(..., *tile.slices())] += tile_pred.to(accumulate) * weight
    return out.to(out_dtype)


def area_overhead(tiles: list[Tile], height: int, width: int) -> float:
    """Sum of tile areas divided by the latent area: 1.0 means no redundant compute."""
    return sum(tile.height * tile.width for tile in tiles) / (height * width)
