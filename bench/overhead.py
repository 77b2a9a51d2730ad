"""synth's per-image cost against a plain diffusers pipeline call on the same model and settings.

    python bench/overhead.py [--reps 5] [--model small_sd15] [--device cpu]

Both run in this process, alternating, after one warm-up each; synth's time includes writing the PNG with
its metadata. Prints the median ratio synth/diffusers (goal <= 1.03) and the peak memory of each.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would be timed too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from synth import pipelines  # noqa: E402
from synth.families import get_family  # noqa: E402
from synth.infer import infer  # noqa: E402


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on GPU, else resident-set peak (sampled)."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def _rss(self):
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs of each, alternating")
    parser.add_argument("--model", default="small_sd15", help="a model config (a twin runs offline)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="synth-bench-")
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("infer", [f"model={args.model}", f"device={args.device}", f"dtype={args.dtype}", "prompt=a red car"])
    with open_dict(cfg):
        cfg.output_dir = out

    # 1. Load both: synth through its own path, diffusers directly from the same folder.
    device = pipelines.resolve_device(cfg.device)
    dtype = pipelines.resolve_dtype(cfg.dtype, device, cfg.model)
    pipelines.ensure_weights(cfg.model)
    family = get_family(cfg.model.family)
    plain = family.pipeline_class("text2img").from_pretrained(cfg.model.path, dtype=dtype).to(device)
    plain.set_progress_bar_config(disable=True)
    size, steps, guidance = cfg.model.native_size, cfg.model.num_inference_steps, cfg.model.guidance_scale

    def run_diffusers():
        generator = torch.Generator("cpu").manual_seed(0)
        plain("a red car", num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=generator)

    def run_synth():
        infer(cfg)

    # 2. Warm up both (first calls pay for lazy initialisation), then alternate timed runs.
    import logging

    logging.getLogger("synth").setLevel(logging.WARNING)
    run_synth()
    pipelines._cache["pipe"].set_progress_bar_config(disable=True)
    run_diffusers()
    times = {"diffusers": [], "synth": []}
    peaks = {"diffusers": 0, "synth": 0}
    for _ in range(args.reps):
        for name, fn in (("diffusers", run_diffusers), ("synth", run_synth)):
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.peak)

    # 3. Report.
    ratios = [s / d for s, d in zip(times["synth"], times["diffusers"])]
    kind = "CUDA max_memory_allocated" if device.type == "cuda" else "process RSS"
    print(f"model={args.model} {size}x{size} steps={steps} device={device} dtype={str(dtype).removeprefix('torch.')} reps={args.reps}")
    for name in times:
        print(f"{name:>9}: median {statistics.median(times[name]):.3f} s/image  peak {kind} {peaks[name] / 2**20:.0f} MiB")
    print(f"median ratio synth/diffusers: {statistics.median(ratios):.3f} (per-pair ratios {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
