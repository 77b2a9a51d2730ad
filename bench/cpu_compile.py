"""accel.compile on the CPU: eager against torch.compile (inductor) on tiny twins, and the recompile counts.

    python bench/cpu_compile.py [--models tiny_sdxl,tiny_sd3] [--reps 5] [--steps 4] [--size 128]
                                [--recompile-backend eager] [--threads 1]

Per model and accel.compile (none, regional, full), in this process: the pipeline through synth's own
get_pipeline (as infer.py builds it), the first call (warm-up: compilation included) and the median of --reps
timed denoising calls (output_type="latent", so the VAE is not timed), and their ratio to eager. Then the graphs
compiled after warm-up (torch._dynamo's counters["stats"]["unique_graphs"]; each is one recompile) across a tiled
highres stage with a ragged last batch of tiles, 4 sweep jobs and 3 UI requests that change seed, prompt and
guidance_scale; --recompile-backend eager (the default) traces and guards exactly as inductor does, without
inductor's minutes of code generation per graph on a small CPU. The twins are random-weight miniatures: the
ratios say what compilation saves in per-call overhead, not what it saves on a real model on a GPU
(bench/gpu_suite.py).
"""

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would be timed too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from synth import pipelines  # noqa: E402
from synth.infer import infer  # noqa: E402

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def compose_infer(overrides, output_dir):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="infer", overrides=list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def fresh() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() keeps the counters
    pipelines._cache.update(key=None, pipe=None)


def time_model(model: str, compile_choice: str, args) -> tuple[float, float]:
    """(first call seconds, median seconds of the timed calls) of the denoising loop."""
    fresh()
    cfg = compose_infer([f"model={model}", "device=cpu", f"accel.compile={compile_choice}",
                         "accel.compile_backend=inductor"], tempfile.mkdtemp())
    pipe = pipelines.get_pipeline(cfg, torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a lighthouse at dusk", "num_inference_steps": args.steps, "guidance_scale": 5.0,
            "width": args.size, "height": args.size, "output_type": "latent"}
    start = time.perf_counter()
    with torch.no_grad():
        pipe(**call, generator=torch.Generator().manual_seed(0))
    first = time.perf_counter() - start
    seconds = []
    for rep in range(args.reps):
        start = time.perf_counter()
        with torch.no_grad():
            pipe(**call, generator=torch.Generator().manual_seed(rep + 1))
        seconds.append(time.perf_counter() - start)
    return first, statistics.median(seconds)


def recompiles(model: str, compile_choice: str, backend: str) -> dict:
    """Graphs compiled after warm-up: in a tiled highres stage (ragged last batch), 4 sweep jobs, 3 UI requests."""
    from synth.ui_requests import Generator, Settings

    fresh()
    folder = Path(tempfile.mkdtemp())
    base = [f"model={model}", "device=cpu", "num_inference_steps=2", f"accel.compile={compile_choice}",
            f"accel.compile_backend={backend}"]
    # 192 px: the 64 px base stage, then a 24 x 24 latent in 4 x 4 tiles of 8: calls of 5, 5, 5 and 1 (padded) tiles
    hires = ["size=192", "highres.tile_size=8", "highres.tile_overlap=2", "highres.tile_batch_size=5"]
    infer(compose_infer([*base, "seed=0"], folder / "warm"))  # the untiled shape
    warm_untiled = graphs()
    infer(compose_infer([*base, *hires, "seed=0"], folder / "hires0"))
    tiled_stage = graphs() - 2 * warm_untiled  # graphs beyond one tile shape's: 0 when the last batch is padded
    warm = graphs()
    infer(compose_infer([*base, *hires, "seed=1", "prompt=a red bicycle", "guidance_scale=7.5"], folder / "hires1"))
    counts = {"tiled stage": tiled_stage, "tiled rerun": graphs() - warm}
    warm = graphs()
    for index, (seed, prompt, guidance) in enumerate([(1, "a cat", 5), (2, "a dog", 6), (3, "a cat", 2.5), (4, "a fox", 7.5)]):
        infer(compose_infer([*base, f"seed={seed}", f"prompt={prompt}", f"guidance_scale={guidance}"], folder / f"job{index}"))
    counts["4 sweep jobs"] = graphs() - warm
    generator = Generator(compose_infer(base, folder), base, folder / "ui", {"model": model})
    warm = graphs()
    for seed, prompt, guidance in [(5, "a cat", 5.0), (6, "a house by a lake", 6.0), (7, "a cat", 3.0)]:
        generator.generate(Settings(prompt=prompt, seed=seed, guidance_scale=guidance))
    counts["3 UI requests"] = graphs() - warm
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny_sdxl,tiny_sd3")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--recompile-backend", default="eager")
    # 1 thread: on a small shared machine, OpenMP threads that wait for busy cores dominate the timings
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models.split(","):
        eager = None
        for compile_choice in ("none", "regional", "full"):
            first, median = time_model(model, compile_choice, args)
            eager = median if compile_choice == "none" else eager
            with contextlib.redirect_stdout(io.StringIO()):  # infer prints each PNG's path
                counts = recompiles(model, compile_choice, args.recompile_backend) if compile_choice != "none" else {}
            rows.append((model, compile_choice, first, median, median / eager, counts))
            print(f"  {model} {compile_choice}: first {first:.2f} s, median {median:.3f} s", file=sys.stderr, flush=True)
    print(f"\n{args.size}x{args.size} px, {args.steps} steps, CFG, {args.threads} threads, torch {torch.__version__}; "
          f"timings with inductor, recompiles with backend {args.recompile_backend}")
    keys = ["tiled stage", "tiled rerun", "4 sweep jobs", "3 UI requests"]
    print(f"{'model':<10} {'compile':<9} {'first call s':>12} {'median s':>9} {'ratio':>6}  " +
          "  ".join(f"{key:>13}" for key in keys))
    for model, compile_choice, first, median, ratio, counts in rows:
        print(f"{model:<10} {compile_choice:<9} {first:>12.2f} {median:>9.3f} {ratio:>6.2f}  " +
              "  ".join(f"{counts.get(key, '-'):>13}" for key in keys))


if __name__ == "__main__":
    main()
