"""The cost of ControlNet during highres refinement, and what running it per tile saves.

    python bench/controlnet.py [--size 1024] [--reps 2] [--model small_sd15] [--device cpu]

Three runs of the same chain (small_sd15 twin: 256 -> 512 -> 1024 px, tiled above 256 px): `controlnet=none`
(the baseline), `controlnet=tile` with the ControlNet per tile beside the UNet, and `controlnet=tile` with
`highres.tiled=false` (UNet and ControlNet on the whole latent, as diffusers runs them). Seconds: median of
--reps after one warm-up each, in this process. Peak memory: each variant once more in a fresh subprocess
(CUDA: max_memory_allocated; CPU: exact live tensor bytes from the profiler's allocation events), beyond what
was allocated before the image (weights, prompt embeddings).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would be timed too
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from synth import highres, pipelines  # noqa: E402
from synth.checks import check_inputs  # noqa: E402

VARIANTS = {
    "none (baseline)": ["controlnet=none"],
    "tile, per tile": ["controlnet=tile"],
    "tile, untiled": ["controlnet=tile", "highres.tiled=false", "highres.vae_tiled=false"],
}


def config(args, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="infer", overrides=[f"model={args.model}", f"size={args.size}",
                                                       f"device={args.device}", *overrides])


def runner(args, overrides):
    """A no-argument function generating one image of the variant (the pipeline and ControlNet loaded once)."""
    cfg = config(args, overrides)
    width, height = check_inputs(cfg)
    device = pipelines.resolve_device(cfg.device)
    pipe = pipelines.get_pipeline(cfg, device, pipelines.resolve_dtype(cfg.dtype, device, cfg.model))
    call = {"prompt": "a harbour town at dusk, detailed", "num_inference_steps": cfg.model.num_inference_steps,
            "guidance_scale": float(cfg.model.guidance_scale)}
    return lambda: highres.generate(pipe, dict(call), cfg, width, height, seed=0), device


def peak_child(args, name) -> None:
    """In a fresh process: peak memory (MiB) of one image of the variant, beyond what was live before it."""
    run, device = runner(args, VARIANTS[name])
    run()  # loads the ControlNet and builds every lazy buffer once
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # exact: the profiler's allocation events, as bench/highres.py reads them
        sys.path.insert(0, str(ROOT / "bench"))
        from highres import allocation_peak, live_allocations

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        _, peak = allocation_peak(live_allocations(prof))
    print(json.dumps({"peak_mib": peak / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_sd15")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_child(args, args.child)

    seconds = {}
    for name, overrides in VARIANTS.items():
        run, _ = runner(args, overrides)
        run()  # warm-up: loads the ControlNet
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    peaks = {}
    for name in VARIANTS:
        with tempfile.TemporaryDirectory() as scratch:
            result = subprocess.run(
                [sys.executable, __file__, f"--model={args.model}", f"--size={args.size}", f"--device={args.device}",
                 f"--child={name}"], capture_output=True, text=True, check=True, cwd=scratch,
            )
        peaks[name] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    base = seconds["none (baseline)"]
    print(f"{args.model} chain to {args.size} px on {args.device}, median of {args.reps} after a warm-up")
    print(f"{'variant':<18} {'s/image':>8} {'ratio':>6} {'peak MiB':>9}")
    for name in VARIANTS:
        print(f"{name:<18} {seconds[name]:>8.2f} {seconds[name] / base:>6.2f} {peaks[name]:>9.1f}")


if __name__ == "__main__":
    main()
