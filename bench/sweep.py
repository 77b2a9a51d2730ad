"""An N-seed sweep in one process (`infer.py -m seed=0,...`) against N separate `infer.py` runs.

    python bench/sweep.py [--seeds 8] [--model small_sd15]

The sweep loads the pipeline once and reuses it; separate runs pay for Python start-up, imports and
loading every time. Prints wall seconds per image for both and their ratio.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"infer.py {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start, result.stderr.count("loading ")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--model", default="small_sd15", help="a twin large enough for loading to matter")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="synth-bench-sweep-"))

    # Build the twin once so neither side pays for it.
    run([f"model={args.model}", "num_inference_steps=1", f"hydra.run.dir={work}/warm"], work)

    seeds = ",".join(str(seed) for seed in range(args.seeds))
    sweep_seconds, sweep_loads = run(["-m", f"model={args.model}", f"seed={seeds}", f"hydra.sweep.dir={work}/sweep"], work)
    separate_seconds, separate_loads = 0.0, 0
    for seed in range(args.seeds):
        seconds, loads = run([f"model={args.model}", f"seed={seed}", f"hydra.run.dir={work}/single{seed}"], work)
        separate_seconds += seconds
        separate_loads += loads

    per_sweep, per_separate = sweep_seconds / args.seeds, separate_seconds / args.seeds
    print(f"model={args.model}, {args.seeds} seeds (wall time, including Python start-up)")
    print(f"  one multirun process : {per_sweep:.2f} s/image, {sweep_loads} pipeline load(s) (+ contact sheet)")
    print(f"  separate infer.py runs: {per_separate:.2f} s/image, {separate_loads} pipeline loads")
    print(f"  ratio separate/sweep: {per_separate / per_sweep:.2f}x")


if __name__ == "__main__":
    main()
