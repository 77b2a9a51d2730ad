"""Exact tiled VAE decode and encode for diffusers' AutoencoderKL: no seams, no colour shift.

Tiled VAEs in the wild (diffusers' `enable_vae_tiling` included) run the whole network per tile, so every
GroupNorm normalises with its tile's statistics instead of the image's: colours shift from tile to tile and
the overlaps are blended to hide it. Here the network runs layer by layer instead:

- each 3x3 convolution runs on output tiles, reading the input tile plus its halo (the rows and columns the
  kernel reaches), so it is exact;
- each GroupNorm uses the statistics of the whole feature map, pooled exactly over chunks (the count-weighted
  mean of chunk means; the mean of chunk variances plus the variance of chunk means, in float64), and is
  applied on the fly to the tile a convolution reads;
- the mid-block self-attention runs once on the whole latent-resolution map, as untiled.

The result equals the untiled VAE up to float rounding. Peak working memory per convolution is bounded by the
tile; the full feature maps between layers live on `storage` (the VAE's device by default, or "cpu").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # rows per chunk when pooling GroupNorm statistics: bounded memory, any image height


def group_stats(x: torch.Tensor, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, group) mean and variance of x over all pixels, pooled exactly from row chunks."""
    batch = x.shape[0]
    groups = norm.num_groups
    count = torch.zeros((), dtype=torch.float64)
    mean = torch.zeros(batch, groups, dtype=torch.float64, device=x.device)
    m2 = torch.zeros_like(mean)  # sum of squared deviations (Chan et al.'s parallel variance)
    for row in range(0, x.shape[2], CHUNK):
        chunk = x[:, :, row : row + CHUNK].to(torch.float64).reshape(batch, groups, -1)
        n = chunk.shape[-1]
        chunk_mean = chunk.mean(-1)
        chunk_m2 = ((chunk - chunk_mean[..., None]) ** 2).sum(-1)
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * n / total)
        count = total
    return mean, m2 / count


def apply_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, stats, activation=None) -> torch.Tensor:
    """GroupNorm of a tile with the whole map's statistics, then the activation (SiLU in every VAE)."""
    mean, var = stats
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    scale = torch.rsqrt(var + norm.eps)  # (batch, groups)
    shape = (batch, groups, 1, 1, 1)
    # the statistics are float64; applying them in float32 is as precise as torch's own GroupNorm
    mean, scale = mean.view(shape).to(x.device, torch.float32), scale.view(shape).to(x.device, torch.float32)
    out = (x.reshape(batch, groups, channels // groups, height, width).to(torch.float32) - mean) * scale
    out = out.reshape(batch, channels, height, width).to(x.dtype)
    if norm.affine:
        out = out * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    return activation(out) if activation is not None else out


def tiled_conv(
    conv: torch.nn.Conv2d,
    x: torch.Tensor,
    tile: int,
    device: torch.device,
    pre=None,
    upsample: bool = False,
    pads: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """conv(pre(x)) computed on output tiles of tile x tile pixels, each from its input window plus halo.

    `upsample` reads x through 2x nearest upsampling first (Upsample2D); `pads` (top, bottom, left, right)
    overrides the conv's own symmetric zero padding (Downsample2D pads only bottom and right by 1).
    """
    assert conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
    kernel_h, kernel_w = conv.kernel_size
    stride_h, stride_w = conv.stride
    top, bottom, left, right = pads if pads is not None else (conv.padding[0],) * 2 + (conv.padding[1],) * 2
    factor = 2 if upsample else 1
    in_h, in_w = x.shape[2] * factor, x.shape[3] * factor
    out_h = (in_h + top + bottom - kernel_h) // stride_h + 1
    out_w = (in_w + left + right - kernel_w) // stride_w + 1
    out = torch.empty(x.shape[0], conv.out_channels, out_h, out_w, dtype=x.dtype, device=x.device)
    for row in range(0, out_h, tile):
        for col in range(0, out_w, tile):
            rows = (row, min(row + tile, out_h))
            cols = (col, min(col + tile, out_w))
            # the input window these outputs read, in (virtual, upsampled) input coordinates
            r0, r1 = rows[0] * stride_h - top, (rows[1] - 1) * stride_h - top + kernel_h
            c0, c1 = cols[0] * stride_w - left, (cols[1] - 1) * stride_w - left + kernel_w
            window = read_window(x, max(r0, 0), min(r1, in_h), max(c0, 0), min(c1, in_w), factor, device)
            if pre is not None:
                window = pre(window)
            padding = (max(-c0, 0), max(c1 - in_w, 0), max(-r0, 0), max(r1 - in_h, 0))
            if any(padding):  # only tiles on the image border read zeros
                window = F.pad(window, padding)
            result = F.conv2d(window, conv.weight, conv.bias, stride=(stride_h, stride_w))
            out[:, :, rows[0] : rows[1], cols[0] : cols[1]] = result.to(out.device)
    return out


def read_window(x, r0, r1, c0, c1, factor, device):
    """Rows r0..r1, columns c0..c1 of x seen through `factor`x nearest upsampling, moved to `device`."""
    if factor == 1:
        return x[:, :, r0:r1, c0:c1].to(device)
    source = x[:, :, r0 // factor : (r1 - 1) // factor + 1, c0 // factor : (c1 - 1) // factor + 1].to(device)
    source = source.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    return source[:, :, r0 % factor : r0 % factor + r1 - r0, c0 % factor : c0 % factor + c1 - c0]


def tiled_resnet(block, x: torch.Tensor, tile: int, device) -> torch.Tensor:
    """ResnetBlock2D (no time embedding) with both GroupNorms on whole-map statistics."""
    assert block.upsample is None and block.downsample is None
    act = block.nonlinearity
    stats = group_stats(x, block.norm1)
    h = tiled_conv(block.conv1, x, tile, device, pre=lambda t: apply_norm(t, block.norm1, stats, act))
    stats = group_stats(h, block.norm2)
    h = tiled_conv(block.conv2, h, tile, device, pre=lambda t: apply_norm(t, block.norm2, stats, act))
    shortcut = x if block.conv_shortcut is None else tiled_conv(block.conv_shortcut, x, tile, device)
    h += shortcut.to(h.device)
    return h / block.output_scale_factor if block.output_scale_factor != 1 else h


def tiled_mid_block(mid, x: torch.Tensor, tile: int, device) -> torch.Tensor:
    x = tiled_resnet(mid.resnets[0], x, tile, device)
    for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attention is not None:  # global self-attention over the latent-resolution map, as untiled
            x = attention(x.to(device)).to(x.device)
        x = tiled_resnet(resnet, x, tile, device)
    return x


def _storage(vae, storage):
    return torch.device(storage) if storage is not None else vae.device


@torch.no_grad()
def decode(vae, z: torch.Tensor, tile: int, storage: str | None = None) -> torch.Tensor:
    """vae.decode(z) (z unscaled, as the VAE takes it) computed tile by tile; tile is in latent pixels."""
    device, store = vae.device, _storage(vae, storage)
    pixels = tile * 8  # output tile of every convolution
    decoder = vae.decoder
    x = z.to(store)
    if vae.post_quant_conv is not None:
        x = tiled_conv(vae.post_quant_conv, x, pixels, device)
    x = tiled_conv(decoder.conv_in, x, pixels, device)
    x = tiled_mid_block(decoder.mid_block, x, pixels, device)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = tiled_resnet(resnet, x, pixels, device)
        for upsampler in block.upsamplers or []:
            x = tiled_conv(upsampler.conv, x, pixels, device, upsample=True)
    stats = group_stats(x, decoder.conv_norm_out)
    act = decoder.conv_act
    x = tiled_conv(decoder.conv_out, x, pixels, device, pre=lambda t: apply_norm(t, decoder.conv_norm_out, stats, act))
    return x.to(device)


@torch.no_grad()
def encode(vae, image: torch.Tensor, tile: int, storage: str | None = None) -> torch.Tensor:
    """The posterior mean of vae.encode(image) computed tile by tile; tile is in latent pixels."""
    device, store = vae.device, _storage(vae, storage)
    pixels = tile * 8
    encoder = vae.encoder
    x = tiled_conv(encoder.conv_in, image.to(store), pixels, device)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            x = tiled_resnet(resnet, x, pixels, device)
        for downsampler in block.downsamplers or []:
            pads = (0, 1, 0, 1) if downsampler.padding == 0 else None  # Downsample2D's asymmetric pad
            x = tiled_conv(downsampler.conv, x, pixels, device, pads=pads)
    x = tiled_mid_block(encoder.mid_block, x, pixels, device)
    stats = group_stats(x, encoder.conv_norm_out)
    act = encoder.conv_act
    x = tiled_conv(encoder.conv_out, x, pixels, device, pre=lambda t: apply_norm(t, encoder.conv_norm_out, stats, act))
    if vae.quant_conv is not None:
        x = tiled_conv(vae.quant_conv, x, pixels, device)
    mean, _logvar = x.chunk(2, dim=1)
    return mean.to(device)
