"""Pixel hashes of every tiny family twin for text-to-image, image-to-image and the high-res chain.

    OMP_NUM_THREADS=1 python bench/same_pixels.py > after.json   # run on two commits and compare the JSON

A refactoring that must not change behaviour produces the same hashes bit for bit. The hash covers the decoded
pixels only (PNG metadata holds paths that differ between checkouts).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("SYNTH_CACHE_DIR", tempfile.mkdtemp(prefix="same-pixels-"))

# highres runs: 2x the 64 px native size, with the decoded-image and the latent upscale, tiled
CASES = {
    "text2img": [],
    "img2img": ["denoise_strength=0.6", "num_inference_steps=3"],
    "highres_lanczos": ["size=128", "highres.tiled=true", "highres.tile_size=8", "highres.tile_overlap=2"],
    "highres_latent": ["size=128", "highres.upscale=latent", "highres.tile_size=8", "highres.tile_overlap=2"],
    "highres_untiled": ["size=128", "highres.tiled=false"],
    "highres_init": ["size=128", "denoise_strength=0.6", "num_inference_steps=3", "highres.tile_size=8"],  # + init_image
    "controlnet_tile": ["size=128", "controlnet=tile", "highres.tile_size=8", "highres.tile_overlap=2"],
}
NEEDS_INIT = ("img2img", "highres_init")


def main() -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from PIL import Image

    from synth.config import twin_models  # also registers the resolvers
    from synth.infer import infer

    torch.set_num_threads(1)
    hashes = {}
    work = Path(tempfile.mkdtemp(prefix="same-pixels-out-"))
    for model in twin_models():  # conf/model/tiny_*.yaml: every family and variant
        base = None
        for case, overrides in CASES.items():
            extra = [f"init_image={base}"] if case in NEEDS_INIT else []
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="infer", overrides=[f"model={model}", "prompt=a red car", "seed=3",
                                                              *overrides, *extra])
            if case.startswith("controlnet") and not cfg.model.get("controlnets"):
                continue  # only the families with ControlNet refinement
            out = work / model / case
            with open_dict(cfg):
                cfg.output_dir = str(out)
            [path] = infer(cfg)
            if case == "text2img":
                base = path
            with Image.open(path) as image:
                hashes[f"{model}/{case}"] = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]
            print(f"{model}/{case}: {hashes[f'{model}/{case}']}", file=sys.stderr, flush=True)
    json.dump(hashes, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
