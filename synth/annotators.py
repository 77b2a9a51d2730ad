"""Condition-image annotators for ControlNet: the line-art generator ControlNet 1.1 "lineart" was trained on.

The lineart condition comes from the line-drawing generator of Chan et al., 2022, "Learning to generate line
drawings that convey geometry and semantics" (informative drawings), as packaged for ControlNet 1.1 lineart by
lllyasviel (weights ``sk_model.pth``, realistic, and ``sk_model2.pth``, coarse, in the hub repo
``lllyasviel/Annotators``; controlnet_aux's ``LineartDetector`` runs the same network). ``LineartGenerator``
rebuilds that network with the same parameter names, so the real files load with ``strict=True``.

The real weights cannot be fetched offline, so ``build_lineart_twin`` writes a random-weight twin with the same
architecture (narrower, fewer residual blocks) in the same file format; tests load it through the very
``LineartAnnotator.from_pretrained`` path the real files take.
"""

import pickle
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from synth.config import check_weights_source
from synth.twins import build_in_place

HUB_REPO = "lllyasviel/Annotators"  # where ControlNet 1.1 publishes its annotator weights
FILENAMES = {False: "sk_model.pth", True: "sk_model2.pth"}  # coarse -> file name
WORK_SIZE_STEP = 64  # the reference rounds the resized image's sides to multiples of 64
MIN_DETECT_RESOLUTION = 64  # one rounding step: smaller values round the shorter side to 0 or back up to 64


# --- the network ------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convs with instance norm, added to the input (names match ``conv_block.N``)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(width, width, 3),
            nn.InstanceNorm2d(width),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(width, width, 3),
            nn.InstanceNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """RGB in [0, 1] -> line drawing in [0, 1] (dark lines on white), as informative drawings' ``Generator(3, 1)``.

    The real ControlNet 1.1 files are ``base_width=64, residual_blocks=3``. The layer indices inside each
    ``modelN`` Sequential are part of the state dict keys (``model0.1.weight``, ``model1.3.weight``, ...), so the
    parameter-free layers (pads, norms, activations) stay where the reference puts them.
    """

    def __init__(self, base_width: int = 64, residual_blocks: int = 3):
        super().__init__()
        width = base_width
        # 1. Stem: 7x7 conv at full resolution.
        self.model0 = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7), nn.InstanceNorm2d(width), nn.ReLU(inplace=True)
        )
        # 2. Two stride-2 downsamplings, each doubling the width.
        downsample = []
        for _ in range(2):
            downsample += [
                nn.Conv2d(width, width * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(width * 2),
                nn.ReLU(inplace=True),
            ]
            width *= 2
        self.model1 = nn.Sequential(*downsample)
        # 3. Residual blocks at a quarter of the resolution.
        self.model2 = nn.Sequential(*(ResidualBlock(width) for _ in range(residual_blocks)))
        # 4. Two transposed-conv upsamplings back to full resolution, each halving the width.
        upsample = []
        for _ in range(2):
            upsample += [
                nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(width // 2),
                nn.ReLU(inplace=True),
            ]
            width //= 2
        self.model3 = nn.Sequential(*upsample)
        # 5. One output channel through a sigmoid.
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def generator_from_state_dict(state_dict, file: Path) -> LineartGenerator:
    """A LineartGenerator holding state_dict, with base width and block count read from its keys and shapes."""
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"{file}: not a state dict of tensors (not a lineart annotator file)")
    stem = state_dict.get("model0.1.weight")
    if stem is None or stem.ndim != 4 or stem.shape[1:] != (3, 7, 7):
        raise ValueError(f"{file}: no 7x7 RGB stem conv 'model0.1.weight' (not a lineart annotator file)")
    block_indices = {int(match[1]) for key in state_dict if (match := re.match(r"model2\.(\d+)\.", key))}
    generator = LineartGenerator(base_width=stem.shape[0], residual_blocks=len(block_indices))
    try:
        generator.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(f"{file}: does not fit the lineart generator ({first_line})") from None
    return generator


# --- the annotator ----------------------------------------------------------------------------


class LineartAnnotator:
    """Turns an image into ControlNet 1.1's lineart condition: white lines on black, at the image's size."""

    def __init__(self, generator: LineartGenerator, device="cpu", dtype: torch.dtype = torch.float32):
        self.generator = generator.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, path: str, coarse: bool = False, device="cpu", dtype=torch.float32):
        """Loads ``sk_model.pth`` (or ``sk_model2.pth`` when coarse) from a local folder or a hub repo id.

        Real weights and twins (``build_lineart_twin``) both take this path.

        Raises:
            FileNotFoundError: The folder lacks the file, or the hub has no such file or cannot be reached.
            ValueError: The file does not unpickle as plain tensors or is not this architecture.
        """
        filename = FILENAMES[bool(coarse)]
        file = _locate(str(path), filename)
        try:
            # weights_only: a .pth is a pickle, and a plain unpickle would run whatever code it names.
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise ValueError(
                f"{file}: not a readable weights-only torch file ({type(error).__name__}); "
                f"re-download {filename} or rebuild the twin"
            ) from None
        return cls(generator_from_state_dict(state_dict, file), device=device, dtype=dtype)

    def __call__(self, image: Image.Image, detect_resolution: int = 512) -> Image.Image:
        """The lineart condition for image: an RGB image of the same size, white lines on black.

        As controlnet_aux's LineartDetector: the generator runs with the shorter side at detect_resolution
        (sides rounded to multiples of 64), its [0, 1] drawing becomes 255 - clip(line * 255), and the map is
        resized back, bilinearly, to the input's size.
        """
        # 1. Check inputs.
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        if not isinstance(detect_resolution, int) or detect_resolution < MIN_DETECT_RESOLUTION:
            raise ValueError(f"detect_resolution={detect_resolution!r}: must be an integer >= {MIN_DETECT_RESOLUTION}")
        # 2. Resize to the work size.
        rgb = _to_rgb(image)
        work = rgb.resize(work_size(rgb.size, detect_resolution), _resample(rgb.size, detect_resolution))
        # 3. Draw lines.
        pixels = torch.from_numpy(np.asarray(work, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            line = self.generator(pixels.to(device=self.device, dtype=self.dtype))[0, 0]
        line = (line.float().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
        # 4. Invert to white lines on black and resize back.
        condition = Image.fromarray(255 - line).resize(image.size, Image.Resampling.BILINEAR)
        return condition.convert("RGB")


def work_size(size: tuple[int, int], detect_resolution: int) -> tuple[int, int]:
    """(width, height) the generator sees: shorter side at detect_resolution, both sides rounded to 64."""
    scale = detect_resolution / min(size)
    return tuple(round(side * scale / WORK_SIZE_STEP) * WORK_SIZE_STEP for side in size)


def _resample(size: tuple[int, int], detect_resolution: int) -> Image.Resampling:
    """Lanczos when enlarging and box (area averaging) when shrinking, as the reference's cv2 resize."""
    return Image.Resampling.LANCZOS if detect_resolution > min(size) else Image.Resampling.BOX


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency laid over white as the reference does (rather than dropping alpha to black)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _locate(path: str, filename: str) -> Path:
    """The local file for path (a folder or a hub repo id), downloading from the hub if it is not cached."""
    if check_weights_source(
        "lineart annotator", path, filename, offline_message=None, folder_error=FileNotFoundError, local_word="folder",
        folder_note=f"; copy it there from the hub repo {HUB_REPO}, or build an offline twin with "
                    "synth.annotators.ensure_lineart_twin",
    ):
        return Path(path).expanduser() / filename
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(path, filename))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"lineart annotator {path}: {filename} is not available offline; download it first "
            f"(hf download {path} {filename}), point the annotator at a local folder holding it, "
            "or use an offline twin (synth.annotators.ensure_lineart_twin)"
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError):
        raise FileNotFoundError(f"lineart annotator {path}: the hub repo has no {filename}") from None


# --- the offline twin -------------------------------------------------------------------------


def build_lineart_twin(out_dir, seed: int = 0, base_width: int = 8, blocks: int = 1) -> Path:
    """Writes random-weight ``sk_model.pth`` and ``sk_model2.pth`` into out_dir, in the real files' format.

    The same seed, width and block count give bit-identical files; the two files get different weights.
    Convs start from N(0, 1/fan_in) with zero biases, written out here rather than left to torch's default
    init (which may change between versions), so the final sigmoid sits in its unsaturated range and the
    lines follow the input image.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename in FILENAMES.values():
        torch.manual_seed(zlib.crc32(f"{seed}/{filename}".encode()))
        generator = LineartGenerator(base_width=base_width, residual_blocks=blocks)
        with torch.no_grad():
            for module in generator.modules():
                if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    module.weight.normal_(0.0, fan_in**-0.5)
                    module.bias.zero_()
        torch.save(generator.state_dict(), out_dir / filename)
    return out_dir


def ensure_lineart_twin(out_dir) -> Path:
    """out_dir holding the default lineart twin, built atomically first if it is not there."""
    return build_in_place(out_dir, FILENAMES[False], build_lineart_twin)
