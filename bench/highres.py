"""Tiled-sampler costs on CPU: tiles, calls, area and FLOP overhead, memory per latent size, and tiled-VAE accuracy.

    python bench/highres.py                 # latents 64..512, the small_sd15 twin (SD1.5-shaped UNet), SD1.5 tile defaults
    python bench/highres.py --sizes 64 128  # fewer sizes

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (no compute, so the untiled
512-latent UNet with its 262k-token attention is counted too).

Memory is measured in a fresh subprocess per size, on one thread, with the tiny SD1.5 twin's UNet and one tile
per call (every UNet call is the same 2 x 64 x 64 batch at every size). It is exact tensor memory, not RSS:
torch.profiler (profile_memory=True) records every CPU tensor allocation and free with the allocator's running
total of live bytes, and the peak is the largest total during one tiled denoiser call minus the total at its
start; the input latent, text embeddings and model weights exist before the call and are not in it. All
columns are taken at the moment of that peak; B = 2 (CFG rows), C = 4 (latent channels), H = W = latent side:

    peak     every live tensor byte the call allocated
    buffers  the latent-sized ones, subtracted, each only if live at the peak: the blend's float64 accumulator
             (B*C*H*W*8 bytes; a tensor allocated outside the UNet with exactly that size) and the returned
             prediction (B*C*H*W*4 bytes; found by its address)
    beyond   peak - buffers: everything else, whatever grows with the latent included (crops, weights, normalisers)
    UNet     the part of the peak allocated inside UNet calls (activations, the previous tile's prediction)
    RSS      resident memory sampled every 2 ms during an earlier unprofiled call, minus before it: allocator and
             library caches included, for reference only

Flatness: +-(max - min) / (max + min) of "beyond" over the sizes (goal: within +-10%).
"""

from __future__ import annotations

import argparse
import itertools
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
UNET_SCOPE = "bench/unet"  # profiler range around each UNet call: tells the UNet's allocations from the blend's


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


def live_allocations(prof) -> list[tuple[int, int, int, int, bool]]:
    """A profile's CPU tensor allocations and frees in time order: (ns, address, bytes (< 0: a free), live bytes, in_unet).

    "live bytes" is the CPU allocator's own running total after the event (ProfiledCPUMemoryReporter), counting only
    tensors allocated while profiling; in_unet says the event ran inside a UNET_SCOPE range.
    """
    from torch._C._profiler import _EventType

    events, pending = [], [(root, False) for root in prof.profiler.kineto_results.experimental_event_tree()]
    while pending:
        event, in_unet = pending.pop()
        in_unet = in_unet or event.name == UNET_SCOPE
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.ptr, fields.alloc_size, fields.total_allocated, in_unet))
        pending.extend((child, in_unet) for child in event.children)
    events.sort()
    for before, after in itertools.pairwise(events):  # the time order must replay the allocator's own total exactly
        if after[3] != before[3] + after[2]:
            raise RuntimeError(f"allocation events out of order at {after[0]} ns: the peak would not be exact")
    return events


def allocation_peak(events) -> tuple[int, int]:
    """(index of the event at the peak, live bytes then minus those live before the first event) of live_allocations."""
    before = events[0][3] - events[0][2]
    peak_at = max(range(len(events)), key=lambda i: events[i][3])
    return peak_at, events[peak_at][3] - before


def rss_peak(call) -> tuple[float, float]:
    """(peak extra resident MiB sampled every 2 ms, seconds) of call(): the process's footprint, allocator included."""
    import psutil

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
    call()
    seconds = time.perf_counter() - start
    done = True
    watcher.join()
    return (peak - baseline) / 2**20, seconds


def peak_child(latent: int) -> None:
    """Run in a subprocess: print (JSON, MiB) the tensor-memory peak of one tiled denoiser call and what is live then."""
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile, record_function

    from synth.tiled_denoiser import TileSettings, unet_forward

    torch.set_num_threads(1)  # one thread: allocations happen one after another, as the events replay them
    unet = UNet2DConditionModel.from_pretrained(twin_folder("tiny"), subfolder="unet").eval()
    sample, timestep, text = unet_inputs(unet, latent)

    def labelled_unet(*args, **kwargs):
        with record_function(UNET_SCOPE):
            return unet.forward(*args, **kwargs)

    def denoise() -> torch.Tensor:
        with torch.no_grad():
            return unet_forward(unet, labelled_unet, TileSettings(TILE, OVERLAP, 1), {}, sample, timestep, text,
                                return_dict=False)[0]

    # 1. Resident memory and time, unprofiled; this first call also makes the UNet's one-time allocations
    rss_mib, seconds = rss_peak(denoise)
    # 2. The same call again, with every CPU tensor allocation and free recorded
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = denoise()
    events = live_allocations(prof)
    peak_at, peak = allocation_peak(events)
    # 3. Which tensors are live at the peak
    live = {}
    for _, address, size, _, in_unet in events[: peak_at + 1]:
        if size > 0:
            live[address] = (size, in_unet)
        else:
            del live[address]
    assert sum(size for size, _ in live.values()) == peak
    # 4. The latent-sized buffers among them: the returned prediction (found by its address, allocated before the
    # peak and never freed) and the blend's float64 accumulator (allocated outside the UNet, exactly its size)
    out_allocated_at = max(i for i, event in enumerate(events) if event[1] == out.data_ptr() and event[2] > 0)
    output = out.numel() * out.element_size() if out_allocated_at <= peak_at else 0
    accumulators = [size for size, in_unet in live.values() if not in_unet and size == out.numel() * 8]
    if len(accumulators) > 1:
        raise RuntimeError(f"{len(accumulators)} live blend tensors of the accumulator's size: cannot tell which")
    mib = 2**-20
    print(json.dumps({
        "peak_mib": peak * mib,
        "output_mib": output * mib,
        "accumulator_mib": sum(accumulators) * mib,
        "unet_mib": sum(size for size, in_unet in live.values() if in_unet) * mib,
        "blend_mib": sum(size for size, in_unet in live.values() if not in_unet) * mib,
        "rss_mib": rss_mib,
        "seconds": seconds,
    }))


def peak_memory(latent: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(latent)], capture_output=True, text=True,
                            check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
          "UNet; memory and s/tile: tiny_sd15 twin's UNet, one tile per call; memory columns in MiB, exact tensor bytes "
          "at the peak of one tiled call except RSS (see --help)")
    header = f"{'latent':>6} {'pixels':>6} {'tiles/step':>10} {'calls/image':>11} {'area':>6} {'FLOPs t/u':>9} " \
             f"{'peak MiB':>9} {'buffers':>8} {'beyond':>7} {'UNet':>6} {'RSS MiB':>8} {'s/tile':>7}"
    print(header)
    beyond = []
    for latent in args.sizes:
        tiles = tile_layout(latent, latent, TILE, OVERLAP)
        calls = STEPS * -(-len(tiles) // BATCH)
        memory = peak_memory(latent)
        buffers = memory["accumulator_mib"] + memory["output_mib"]
        beyond.append(memory["peak_mib"] - buffers)
        print(f"{latent:>6} {latent * 8:>6} {len(tiles):>10} {calls:>11} {area_overhead(tiles, latent, latent):>6.3f} "
              f"{flop_ratio(latent):>9.3f} {memory['peak_mib']:>9.2f} {buffers:>8.2f} {beyond[-1]:>7.2f} "
              f"{memory['unet_mib']:>6.2f} {memory['rss_mib']:>8.1f} {memory['seconds'] / len(tiles):>7.3f}")
    spread = (max(beyond) - min(beyond)) / (max(beyond) + min(beyond))
    print(f"peak beyond buffers: {min(beyond):.2f}..{max(beyond):.2f} MiB, +-{100 * spread:.1f}% as (max - min) / "
          f"(max + min) (goal: within +-10%)")
    vae = vae_comparison()
    print(
        f"VAE decode, 768 px smooth latent, 256 px tiles: max |err| on the 1/8 mean-pooled image vs untiled: "
        f"synth {vae['synth_pooled_err']:.2e}, diffusers enable_vae_tiling {vae['diffusers_pooled_err']:.2e}; "
        f"seconds untiled {vae['untiled_s']:.2f}, synth {vae['synth_s']:.2f}, diffusers {vae['diffusers_s']:.2f}"
    )


if __name__ == "__main__":
    main()
