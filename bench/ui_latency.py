"""Request-to-image latency of the web UI against the same generate call in this process.

    python bench/ui_latency.py                       # the SDXL-Turbo twin on CPU, 64 px, 2 steps, median of 10
    python bench/ui_latency.py --repeats 20 --steps 1 --size 128

Rows (median ms of --repeats runs after one warm-up each):
- pipeline: the diffusers pipeline call alone (pipe(**call)), as synth.highres.generate makes it;
- generate: synth.ui_requests.Generator.generate in-process: synth.infer.infer with its checks, prompt encoding and
  the PNG written with provenance, which is what the page runs per request;
- server REST: the same request through the running Gradio server over its HTTP API (POST /gradio_api/call/live,
  then its event stream; what the page itself does over one connection), and the PNG fetched from the server;
- server client: the same through gradio_client (its job threads, event stream and download of the PNG).
UI overhead = server - generate (goal: <= 15% and <= 50 ms).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_ms(run, repeats: int) -> float:
    run()  # warm-up: the pipeline, the twin, the client's connection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def rest_call(http, api_name: str, data: list):
    """One request over Gradio's HTTP API: join, read the event stream to its end, fetch the image it names."""
    import json

    event_id = http.post(f"gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
    result = None
    with http.stream("GET", f"gradio_api/call/{api_name}/{event_id}") as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "complete":
                result = json.loads(line.partition(":")[2])
            elif event == "error":
                raise RuntimeError(line)
    image = http.get(result[0]["url"])
    image.raise_for_status()
    return image.content


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_sdxl_turbo")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier figures on a shared CPU)")
    args = parser.parse_args()

    import httpx
    import torch
    from gradio_client import Client

    from synth import pipelines
    from synth.families import get_family
    from synth.prompt_encoding import prompt_kwargs
    from synth.ui import start
    from synth.ui_requests import Settings

    torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="synth-ui-latency-"))
    demo, generator, url = start([f"model={args.model}"], run_dir, free_port())
    try:
        size = str(args.size) if args.size else None
        settings = Settings(prompt="a red car", seed=1, num_inference_steps=args.steps, size=size)

        # 1. The pipeline call alone, on the pipeline the generate function built (the process's cache).
        generator.generate(settings)
        cfg = generator.config(settings, None, run_dir / "pipeline")
        family = get_family(cfg.model.family)
        device = pipelines.resolve_device(cfg.device)
        pipe = pipelines.get_pipeline(cfg, device, pipelines.resolve_dtype(cfg.dtype, device, cfg.model))
        width = height = args.size or int(cfg.model.native_size)
        call = {**prompt_kwargs(pipe, family, "a red car", "", float(cfg.model.guidance_scale), cfg.model),
                "num_inference_steps": args.steps, "guidance_scale": float(cfg.model.guidance_scale),
                **family.call_kwargs(cfg.model, "text2img", width, height)}
        pipe.set_progress_bar_config(disable=True)
        rows = {"pipeline": median_ms(lambda: pipe(**call, generator=torch.Generator().manual_seed(1)), args.repeats)}

        # 2. The generate function in-process; 3. the same request through the server.
        rows["generate"] = median_ms(lambda: generator.generate(settings), args.repeats)
        data = ["a red car", "", 1, args.steps, 0.5, None, True]
        http = httpx.Client(base_url=url, timeout=None)
        rows["server REST"] = median_ms(lambda: rest_call(http, "live", data), args.repeats)
        client = Client(url, verbose=False)
        rows["server client"] = median_ms(lambda: client.predict(*data, api_name="/live"), args.repeats)
    finally:
        demo.close()

    base = rows["generate"]
    print(f"\n{args.model}, {width}x{height}, {args.steps} steps, CPU x{args.threads} thread(s), median of {args.repeats}")
    print(f"{'path':<14} {'ms':>9} {'ratio':>7} {'overhead ms':>12}")
    for name, ms in rows.items():
        print(f"{name:<14} {ms:9.1f} {ms / base:7.3f} {ms - base:12.1f}")
    for name in ("server REST", "server client"):
        overhead = rows[name] - base
        verdict = "met" if overhead <= 50 and overhead <= 0.15 * base else "not met"
        print(f"UI overhead ({name}): {overhead:.1f} ms = {overhead / base:.1%} of generate "
              f"(goal <= 15% and <= 50 ms: {verdict})")


if __name__ == "__main__":
    main()
