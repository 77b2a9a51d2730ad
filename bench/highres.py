"""Tiled-sampler costs on CPU: tiles, calls, area and FLOP overhead, memory per latent size, and tiled-VAE accuracy.

    python bench/highres.py                 # latents 64..512, the small_sd15 twin (SD1.5-shaped UNet), SD1.5 tile defaults
    python bench/highres.py --sizes 64 128  # fewer sizes

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (no compute, so the untiled
512-latent UNet with its 262k-token attention is counted too). Peak memory is measured in a fresh subprocess
per size (the tiny SD1.5 twin's UNet, one tile per call, so every call is the same 2 x 64 x 64 batch at every
size): resident memory sampled every 2 ms during one tiled denoiser call, minus the memory before it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from synth.tiling import area_overhead, tile_layout

TILE, OVERLAP, BATCH, STEPS = 64, 8, 4, 30  # SD1.5 defaults: native latent tile, 1/8 overlap; a 30-step pass


def twin_folder(preset: str) -> Path:
    from synth import twins
    from synth.config import cache_dir

    return twins.ensure_twin("sd15", Path(cache_dir()) / "twins" / "v1" / f"sd15-{preset}", preset)


def unet_inputs(unet, latent: int, batch: int = 2, device="cpu"):
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, device=device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    return sample, torch.tensor([500.0] * batch, device=device), text


def flop_ratio(latent: int) -> float:
    """FLOPs of one tiled denoiser call / one untiled call, counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from synth.tiled_denoiser import TileSettings, unet_forward

    config = UNet2DConditionModel.load_config(twin_folder("small") / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    sample, timestep, text = unet_inputs(unet, latent, device="meta")
    counts = []
    for tiled in (False, True):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            if tiled:
                unet_forward(unet, unet.forward, TileSettings(TILE, OVERLAP, BATCH), {}, sample, timestep, text)
            else:
                unet(sample, timestep, text)
        counts.append(counter.get_total_flops())
    return counts[1] / counts[0]


def peak_child(latent: int) -> None:
    """Run in a subprocess: print the peak extra resident memory (MiB) of one tiled denoiser call."""
    import psutil
    from diffusers import UNet2DConditionModel

    from synth.tiled_denoiser import TileSettings, unet_forward

    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(twin_folder("tiny"), subfolder="unet").eval()
    sample, timestep, text = unet_inputs(unet, latent)
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = False

    def sample_rss():
        nonlocal peak
        while not done:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    watcher = threading.Thread(target=sample_rss)
    watcher.start()
    start = time.perf_counter()
    with torch.no_grad():
        out = unet_forward(unet, unet.forward, TileSettings(TILE, OVERLAP, 1), {}, sample, timestep, text,
                           return_dict=False)[0]
    seconds = time.perf_counter() - start
    done = True
    watcher.join()
    buffers = out.numel() * out.element_size() * 3  # output, float64 accumulator (2x)
    print(json.dumps({"peak_mib": (peak - baseline) / 2**20, "buffers_mib": buffers / 2**20, "seconds": seconds}))


def peak_memory(latent: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(latent)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def vae_comparison(latent: int = 96, tile: int = 32) -> dict:
    """Max |difference| from the untiled decode on the 1/8 mean-pooled image: synth's tiled VAE vs diffusers'."""
    from diffusers import AutoencoderKL

    from synth import tiled_vae

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(twin_folder("small"), subfolder="vae").eval()
    rows, columns = torch.linspace(0, 3, latent)[:, None], torch.linspace(0, 4, latent)[None]
    z = torch.stack([torch.sin(rows * (c + 1) * 0.5) * torch.cos(columns * 0.7 + c) for c in range(4)])[None]
    pool = torch.nn.functional.avg_pool2d
    results = {}
    with torch.no_grad():
        start = time.perf_counter()
        untiled = vae.decode(z).sample
        results["untiled_s"] = time.perf_counter() - start
        start = time.perf_counter()
        ours = tiled_vae.decode(vae, z, tile)
        results["synth_s"] = time.perf_counter() - start
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * 8
        start = time.perf_counter()
        theirs = vae.decode(z).sample
        results["diffusers_s"] = time.perf_counter() - start
    results["synth_pooled_err"] = (pool(ours, 8) - pool(untiled, 8)).abs().max().item()
    results["diffusers_pooled_err"] = (pool(theirs, 8) - pool(untiled, 8)).abs().max().item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="latent sides")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_child(args.child)

    print(f"tile {TILE}, overlap {OVERLAP}, {BATCH} tiles per call (x2 CFG), {STEPS}-step pass; FLOPs: small_sd15 twin's "
          "UNet; memory and s/tile: tiny_sd15 twin's UNet, one tile per call")
    header = f"{'latent':>6} {'pixels':>6} {'tiles/step':>10} {'calls/image':>11} {'area':>6} {'FLOPs t/u':>9} " \
             f"{'peak MiB':>9} {'buffers MiB':>11} {'s/tile':>7}"
    print(header)
    peaks = []
    for latent in args.sizes:
        tiles = tile_layout(latent, latent, TILE, OVERLAP)
        calls = STEPS * -(-len(tiles) // BATCH)
        memory = peak_memory(latent)
        peaks.append(memory["peak_mib"] - memory["buffers_mib"])
        print(f"{latent:>6} {latent * 8:>6} {len(tiles):>10} {calls:>11} {area_overhead(tiles, latent, latent):>6.3f} "
              f"{flop_ratio(latent):>9.3f} {memory['peak_mib']:>9.1f} {memory['buffers_mib']:>11.1f} "
              f"{memory['seconds'] / len(tiles):>7.3f}")
    spread = (max(peaks) - min(peaks)) / (sum(peaks) / len(peaks))
    print(f"peak beyond buffers: {min(peaks):.1f}..{max(peaks):.1f} MiB, mean +-{50 * spread:.1f}% (goal: within +-10%)")
    vae = vae_comparison()
    print(
        f"VAE decode, 768 px smooth latent, 256 px tiles: max |err| on the 1/8 mean-pooled image vs untiled: "
        f"synth {vae['synth_pooled_err']:.2e}, diffusers enable_vae_tiling {vae['diffusers_pooled_err']:.2e}; "
        f"seconds untiled {vae['untiled_s']:.2f}, synth {vae['synth_s']:.2f}, diffusers {vae['diffusers_s']:.2f}"
    )


if __name__ == "__main__":
    main()
