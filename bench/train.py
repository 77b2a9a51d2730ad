"""LoRA training speed and peak memory per family on the twins.

    python bench/train.py [--families sd15,sdxl,sd3,kolors,hunyuan_dit] [--preset tiny] [--steps 12] [--size 64]

Each family trains in its own child process (so peak memory is that family's alone) through synth.train.run.fit,
with the same settings as `python train.py model=<preset>_<family> trainer=cpu logger=none callbacks=none`.
Steps per second are timed over the steps after the first two (warm-up). Peak memory is the CUDA allocator's
peak on a GPU, else the child's peak resident set. Each family runs twice: encoding every step, and with
data.cache=true (VAE posteriors and text embeddings read from a fresh disk cache); the ratio is cached/plain.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def child(family: str, preset: str, steps: int, size: int, cache: bool) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SYNTH_CACHE_DIR", str(Path("~/.cache/synth").expanduser()))  # reuse built twins
    os.environ["WANDB_MODE"] = "disabled"
    import lightning as L
    import torch
    from train_utils import compose_train, make_dataset

    from synth.train.run import fit

    class StepTimer(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, *args):
            self.times.append(time.perf_counter())

    folder = Path(tempfile.mkdtemp(prefix="synth-bench-train-"))
    data = make_dataset(folder / "data", count=4, sizes=((size + size // 4, size),))
    cfg = compose_train(
        [f"model={preset}_{family}", f"data.path={data}", f"data.size={size}", f"trainer.max_steps={steps}",
         "trainer.accelerator=auto", "callbacks=none", f"data.cache={str(cache).lower()}",
         f"data.cache_dir={folder / 'cache'}"],
        output_dir=folder / "run",
    )
    timer = StepTimer()
    from synth.train import run as run_module

    make_callbacks = run_module.make_callbacks
    run_module.make_callbacks = lambda cfg, logger: make_callbacks(cfg, logger) + [timer]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fit(cfg)
    timed = timer.times[2:]
    steps_per_second = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"family": family, "steps_per_second": steps_per_second, "peak_bytes": peak,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd15,sdxl,sd3,kolors,hunyuan_dit")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.preset, args.steps, args.size, args.cache)), flush=True)
        return
    print(f"{'family':<12} {'steps/s':>8} {'cached':>8} {'ratio':>6} {'peak MiB':>9} {'cached':>8}  device")
    for family in args.families.split(","):
        results = []
        for cache in (False, True):
            command = [sys.executable, __file__, "--child", family, "--preset", args.preset, "--steps",
                       str(args.steps), "--size", str(args.size)] + (["--cache"] if cache else [])
            out = subprocess.run(command, check=False, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
                print(f"{family:<12} failed: {tail}")
                break
            results.append(json.loads(lines[-1][len("RESULT "):]))
        if len(results) == 2:
            plain, cached = results
            print(
                f"{family:<12} {plain['steps_per_second']:>8.2f} {cached['steps_per_second']:>8.2f} "
                f"{cached['steps_per_second'] / plain['steps_per_second']:>6.2f} {plain['peak_bytes'] / 2**20:>9.0f} "
                f"{cached['peak_bytes'] / 2**20:>8.0f}  {plain['device']}"
            )

if __name__ == "__main__":
    main()
