"""What prompt processing costs: added time per image for each prompter, and long-prompt encode time.

    python bench/prompts.py [--reps 5] [--model tiny_sd15] [--device cpu]

Part 1 runs whole images (synth.infer.infer) with prompter=none and each tiny_* prompter, alternating after a
warm-up (which also builds the twins), and prints each prompter's median added seconds per image and the ratio
to prompter=none. Part 2 times encoding a 77-token prompt and prompts of 2 and 4 CLIP chunks for the model's
family, and prints the ratios against the 77-token prompt.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from synth import pipelines  # noqa: E402
from synth.infer import infer  # noqa: E402
from synth.prompt_encoding import prompt_kwargs, token_chunks  # noqa: E402

CONF = str(Path(__file__).resolve().parent.parent / "conf")
PROMPTERS = ["none", "tiny_translate", "tiny_refine", "tiny_translate_refine"]
PROMPT = "一只猫坐在窗台上"  # Chinese, so the translators run


def config(overrides, output_dir):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="infer", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def time_images(args, out):
    times = {name: [] for name in PROMPTERS}
    for rep in range(args.reps + 1):  # rep 0 warms up: builds twins, loads models
        for name in PROMPTERS:
            cfg = config([f"model={args.model}", f"prompter={name}", f"prompt='{PROMPT}'", f"device={args.device}"], out / f"{name}-{rep}")
            start = time.perf_counter()
            infer(cfg)
            if rep:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["none"])
    print(f"{'prompter':24} {'s/image':>9} {'added s':>9} {'ratio':>7}")
    for name in PROMPTERS:
        median = statistics.median(times[name])
        print(f"{name:24} {median:9.3f} {median - base:9.3f} {median / base:7.2f}")


def time_encoding(args, out):
    cfg = config([f"model={args.model}", f"device={args.device}"], out)
    device = pipelines.resolve_device(args.device)
    pipe = pipelines.get_pipeline(cfg, device, pipelines.resolve_dtype(cfg.dtype, device, cfg.model))
    words = "a red car parked on a street at night in the rain, "
    prompts = {}
    for chunks in (1, 2, 4):
        text = ""
        while len(token_chunks(pipe.tokenizer, text + words)) <= chunks and len(pipe.tokenizer(text + words, add_special_tokens=False).input_ids) <= 75 * chunks:
            text += words
        prompts[chunks] = text
    times = {chunks: [] for chunks in prompts}
    for rep in range(args.reps * 4 + 1):
        for chunks, text in prompts.items():
            start = time.perf_counter()
            prompt_kwargs(pipe, cfg.model.family, text, "blurry", 7.0, cfg.model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[chunks].append(time.perf_counter() - start)
    base = statistics.median(times[1])
    print(f"\n{'prompt (CLIP tokens)':24} {'encode ms':>9} {'ratio':>7}")
    for chunks, text in prompts.items():
        tokens = len(pipe.tokenizer(text, add_special_tokens=False).input_ids)
        median = statistics.median(times[chunks])
        print(f"{f'{tokens} ({chunks} chunk)':24} {median * 1000:9.2f} {median / base:7.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", default="tiny_sd15")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        print(f"{args.model} on {args.device}, prompt {PROMPT!r}, median of {args.reps}")
        time_images(args, Path(out))
        time_encoding(args, Path(out) / "encode")


if __name__ == "__main__":
    main()
