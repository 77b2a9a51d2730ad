"""Staged high-resolution sampling: generate at the native size, then upscale (at most 2x per stage) and refine.

The "highres fix" chain of the reference results: text-to-image at the family's native area, then per stage
an upscale (Lanczos on the decoded image, or bilinear on the latent) and an image-to-image pass at that
stage's strength. Above one tile the denoiser runs tiled (synth/tiled_denoiser.py) and so do the VAE's
decode and encode (synth/tiled_vae.py). `plan_stages` and `check_highres` need no torch, so bad input fails
before anything loads; `generate` runs the chain.
"""

from __future__ import annotations

import logging
from pathlib import Path

from synth import controlnet
from synth.config import check_size, parse_size
from synth.families import get_family
from synth.stages import Stage, enter_at, plan_stages, refine_steps, staged  # noqa: F401  (the plan; re-exported)

log = logging.getLogger(__name__)

TILED = ("auto", True, False)
UPSCALERS = ("lanczos", "latent")
TILE_DEVICES = ("auto", "cpu")


def tile_step(family_name: str) -> int:
    """Tile sizes are multiples of this many latent pixels: 8 for UNets, the patch size for DiTs."""
    return get_family(family_name).tile_step


def tile_sizes(highres, native_size: int, family_name: str) -> tuple[int, int]:
    """(tile_size, tile_overlap) in latent pixels: the family's native latent and 1/8 of it unless set."""
    tile = highres.get("tile_size") or native_size // 8
    overlap = highres.get("tile_overlap")
    if overlap is None:
        overlap = max(tile // 8, get_family(family_name).size_step // 8)
    return tile, overlap


def check_highres(cfg, width: int, height: int) -> None:
    """Refuse bad highres settings before any model loads (called from synth.checks.check_inputs)."""
    highres = cfg.get("highres")
    if not staged(highres):
        return
    model = cfg.model
    family = get_family(model.family)
    tiled = highres.get("tiled", "auto")
    if tiled not in TILED:
        raise ValueError(f"highres.tiled={tiled}: choose auto, true or false")
    upscale = highres.get("upscale", "lanczos")
    if upscale not in UPSCALERS:
        raise ValueError(f"highres.upscale={upscale}: choose one of {', '.join(UPSCALERS)}")
    if highres.get("tile_device", "auto") not in TILE_DEVICES:
        raise ValueError(f"highres.tile_device={highres.tile_device}: choose one of {', '.join(TILE_DEVICES)}")
    step = tile_step(family.name)
    for key in ("tile_size", "vae_tile_size"):
        value = highres.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < step or value % step:
            raise ValueError(
                f"highres.{key}={value}: must be a positive multiple of {step} latent pixels for {family.name} "
                f"({family.tile_step_reason})"
            )
    tile, overlap = tile_sizes(highres, model.native_size, family.name)
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < tile:
        raise ValueError(f"highres.tile_overlap={overlap}: must be an integer in [0, tile_size={tile})")
    batch = highres.get("tile_batch_size", 1)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"highres.tile_batch_size={batch}: must be an integer >= 1")
    for name, values in (highres.get("strengths") or {}).items():
        for value in values:
            check_strength(f"highres.strengths.{name}", value)
    stage_steps = highres.get("stage_steps")
    if stage_steps is not None and (not isinstance(stage_steps, int) or isinstance(stage_steps, bool) or stage_steps < 1):
        raise ValueError(f"highres.stage_steps={stage_steps}: must be an integer >= 1")
    if highres.get("stages"):
        check_stages(highres, model, family, width, height)
    # The released weights' limit (model.untiled_limit_px, else the family's); check_untiled_fits reads the loaded config.
    limit = model.get("untiled_limit_px", family.untiled_limit_px)
    if limit is not None and tiled is False and max(width, height) > limit:
        raise ValueError(
            f"highres.tiled=false: {family.name} cannot run untiled at {width}x{height} (its positional embedding "
            f"covers {limit} px); use highres.tiled=auto"
        )


def check_strength(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value}: strengths must be in (0, 1]")


def check_stages(highres, model, family, width: int, height: int) -> None:
    """Explicit stages: readable sizes that grow stage by stage, strengths in (0, 1], the last at `size`."""
    previous = None
    for index, spec in enumerate(highres.stages):
        where = f"highres.stages[{index}]"
        if not hasattr(spec, "get") or spec.get("size") is None:
            raise ValueError(f"{where}={spec}: give each stage as {{size: 1024, strength: 0.5, steps: 30}}")
        stage_width, stage_height = parse_size(spec.size, model.native_size)
        check_size(stage_width, stage_height, family.name)
        check_strength(f"{where}.strength", spec.get("strength", 0.5))
        steps = spec.get("steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"{where}.steps={steps}: must be an integer >= 1")
        if steps is not None and family.img2img_steps(steps, spec.get("strength", 0.5)) < 1:
            raise ValueError(f"{where}: steps={steps} at strength {spec.get('strength', 0.5)} runs no step")
        if previous is not None and not (
            stage_width >= previous[0] and stage_height >= previous[1] and stage_width * stage_height > previous[0] * previous[1]
        ):
            raise ValueError(
                f"{where}.size={spec.size}: stage sizes must increase (the previous stage is {previous[0]}x{previous[1]})"
            )
        previous = (stage_width, stage_height)
    if previous != (width, height):
        raise ValueError(
            f"highres.stages: the last stage is {previous[0]}x{previous[1]} but size is {width}x{height}; "
            f"set size={previous[0]}x{previous[1]}"
        )


def tile_settings(highres, model, family_name: str, vae_scale_factor: int, pad_last_batch: bool = False):
    from synth.tiled_denoiser import TileSettings

    tile, overlap = tile_sizes(highres, model.native_size, family_name)
    align = get_family(family_name).tile_align
    return TileSettings(tile, overlap, int(highres.get("tile_batch_size", 4)), align, vae_scale_factor, pad_last_batch)


def generate(pipe, call: dict, cfg, width: int, height: int, seed: int, out_dir=None, stem: str = "image"):
    """One image for `call` at width x height: a plain pipeline call, or the staged, tiled chain.

    Returns (PIL image, stats): stats holds the stages planned, the plan run ("plan", from the init image's entry
    stage on) and denoiser calls/tiles.
    """
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)  # the same noise on every device
    highres, model = cfg.get("highres"), cfg.model
    family = get_family(model.family)
    steps = call["num_inference_steps"]

    # 1. Plan the chain (synth.stages); at or below native size it is one plain pipeline call.
    plan = plan_stages(highres, family.name, model.native_size, width, height, steps)
    stats: dict = {"stages": [f"{stage.width}x{stage.height}" for stage in plan], "plan": plan}
    control = controlnet.active(cfg)
    if not staged(highres) or (
        len(plan) == 1 and not control and not needs_tiling(highres, model, family.name, width, height)
    ):
        # as diffusers does it; "np" and then numpy_to_pil is what "pil" does, bit for bit, with a look at the pixels
        guard = stop_on_nonfinite(label=f"{width}x{height}")
        pixels = pipe(**call, generator=generator, output_type="np", callback_on_step_end=guard).images
        check_finite_pixels(pixels)
        return pipe.image_processor.numpy_to_pil(pixels)[0], stats

    # 2. An init image enters the chain at the largest stage it matches or exceeds.
    image = None
    if cfg.get("init_image") is not None:
        from synth.images import open_image_as_viewed

        image = open_image_as_viewed(str(cfg.init_image), "init_image")  # as infer.py reads it: EXIF-rotated
        entry, plan = enter_at(plan, image.width, image.height, float(cfg.denoise_strength), steps)
    else:
        entry = 0
    stats["entry"], stats["plan"] = entry, plan  # the stages that run (the PNG's Size and Hires fields)
    tiling = highres.get("tiled", "auto")
    check_untiled_fits(pipe, family, plan, tiling is not False)

    # 3. The stages' pipelines, sharing pipe's weights; the ControlNet steers every refinement.
    run = ChainRun(pipe, cfg, family, generator, stats, out_dir, stem, entry)
    shared = {key: value for key, value in call.items() if key not in ("image", "strength", "width", "height")}

    # 4. Run the stages: the base is text-to-image; every later one upscales the last result and refines it.
    latents = None
    for index, stage in enumerate(plan):
        if stage.strength is None:
            latents = run.base(stage, index, shared)
        else:
            latents, image = run.refine(stage, index, shared, latents, image)
        log.info("stage %d/%d: %dx%d (strength %s, %d steps)", index + 1, len(plan), stage.width, stage.height,
                 stage.strength, stage.steps)
        # 5. Intermediate images on request, written beside the final one.
        if highres.get("save_intermediate") and index < len(plan) - 1 and out_dir is not None:
            run.save_intermediate(latents, stage, index)

    # 6. Decode the last stage.
    return decode(pipe, latents, highres, model, family.name), stats


class ChainRun:
    """The pipelines and settings one run of the chain shares between its stages (see `generate`)."""

    def __init__(self, pipe, cfg, family, generator, stats: dict, out_dir, stem: str, entry: int):
        # exact class checks: synth's Hunyuan-DiT image-to-image pipeline subclasses the text-to-image one
        self.text2img, self.img2img = (
            pipe if type(pipe) is family.pipeline_class(task) else family.pipeline_class(task).from_pipe(pipe)
            for task in ("text2img", "img2img")
        )
        for each in (self.text2img, self.img2img):
            each.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        self.control = controlnet.active(cfg)
        if self.control:
            self.img2img = controlnet.pipeline(pipe, cfg)
        self.pipe, self.cfg, self.family, self.generator, self.stats = pipe, cfg, family, generator, stats
        self.highres, self.model = cfg.get("highres"), cfg.model
        self.out_dir, self.stem, self.entry = out_dir, stem, entry
        from synth.compile import is_compiled
        from synth.tiled_denoiser import denoiser_of

        # a compiled denoiser gets full batches of tiles only: no graph for a ragged last batch
        self.settings = tile_settings(self.highres, self.model, family.name, pipe.vae_scale_factor,
                                      pad_last_batch=is_compiled(denoiser_of(pipe)))
        self.tiled_forward = family.tiled_forward_function()

    def tiles(self, size) -> bool:
        """tiled=true sends every stage through the tiler (one tile when the latent fits: bitwise the plain call);
        auto only the stages whose latent is larger than a tile."""
        tiling = self.highres.get("tiled", "auto")
        return tiling is True or (tiling == "auto" and max(size) // self.pipe.vae_scale_factor > self.settings.tile_size)

    def tiled(self, pipe, size):
        from contextlib import nullcontext

        from synth.tiled_denoiser import tiled_denoiser

        if not self.tiles(size):
            return nullcontext()
        return tiled_denoiser(pipe, self.settings, self.stats, forward=self.tiled_forward)

    def guard(self, index: int, size):
        number, total = index + self.entry + 1, self.entry + len(self.stats["plan"])
        return stop_on_nonfinite(f"stage {number} ({size[0]}x{size[1]})",  # nan latents end the run
                                 f"stage {number}/{total}: {size[0]}x{size[1]}")

    def base(self, stage, index: int, shared: dict):
        """The base stage: text-to-image at the stage's size, as latents."""
        size = (stage.width, stage.height)
        with self.tiled(self.text2img, size):
            arguments = {**shared, **self.family.call_kwargs(self.model, "text2img", *size)}
            latents = self.text2img(**arguments, generator=self.generator, output_type="latent",
                                    callback_on_step_end=self.guard(index, size)).images
        return self.family.pipeline_latents(self.text2img, latents, *size)

    def refine(self, stage, index: int, shared: dict, latents, image):
        """A refinement: upscale the last latents (or the init image) to the stage's size and run image-to-image
        at its strength, steered by the ControlNet if one is active. Returns (latents, the upscaled image)."""
        import torch
        from PIL import Image

        pipe, highres, model, name = self.pipe, self.highres, self.model, self.family.name
        size = (stage.width, stage.height)
        if latents is not None and highres.get("upscale", "lanczos") == "latent":
            source = torch.nn.functional.interpolate(
                latents, size=(stage.height // pipe.vae_scale_factor, stage.width // pipe.vae_scale_factor),
                mode="bilinear", align_corners=False,
            )
            if self.control:  # the condition is an image: decode the last stage for it
                image = decode(pipe, latents, highres, model, name).resize(size, Image.LANCZOS)
        else:
            if latents is not None:
                image = decode(pipe, latents, highres, model, name)
            if image.size != size:
                image = image.resize(size, Image.LANCZOS)
            source = encode(pipe, image, highres, model, name)
        arguments = {**shared, **self.family.call_kwargs(model, "img2img", *size), "num_inference_steps": stage.steps}
        if self.control:  # the upscaled image (tile) or its line art (lineart) steers the refinement
            condition = controlnet.condition(self.cfg, image, self.img2img._execution_device)
            arguments.update(control_image=condition, **controlnet.call_kwargs(self.cfg))
            if highres.get("save_intermediate") and self.out_dir is not None and self.cfg.controlnet.name != "tile":
                from synth.images import save_png

                number = index + self.entry
                save_png(condition, Path(self.out_dir), f"{self.stem}-stage{number}-{self.cfg.controlnet.name}",
                         {"synth-stage": f"ControlNet condition of stage {number} of {self.stem}"})
        with self.tiled(self.img2img, size):
            latents = self.img2img(**arguments, image=source, strength=stage.strength, generator=self.generator,
                                   output_type="latent", callback_on_step_end=self.guard(index, size)).images
        return self.family.pipeline_latents(self.img2img, latents, *size), image

    def save_intermediate(self, latents, stage, index: int) -> None:
        from synth.images import save_png

        number, size = index + self.entry, f"{stage.width}x{stage.height}"
        intermediate = decode(self.pipe, latents, self.highres, self.model, self.family.name)
        save_png(intermediate, Path(self.out_dir), f"{self.stem}-stage{number}-{size}",
                 {"synth-stage": f"stage {number} of {self.stem}: {size}"})


def stop_on_nonfinite(where: str = "sampling", label: str | None = None):
    """A diffusers callback_on_step_end that stops the run at the first step whose latents hold nan or inf: every
    later step and the decoded image would be nan too, and a black PNG would be written with exit code 0.

    The same callback serves a caller's step hooks (synth.step_hooks: the web UI's Cancel and its progress,
    reported as `label`); without an observer that part is a no-op."""
    from synth.step_hooks import check_cancelled, on_step

    check_cancelled(where)  # cancelled before this call started (between stages or images): do not start it

    def check(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        import torch

        if not torch.isfinite(callback_kwargs["latents"]).all():
            raise ValueError(
                f"{where}: the latents became nan or inf at step {step + 1}; nothing was written (a LoRA or "
                "embedding with extreme weights, an extreme guidance_scale, or fp16 overflow: try dtype=fp32)"
            )
        on_step(label or where, step, getattr(pipe, "_num_timesteps", None))  # progress, then Cancel
        return callback_kwargs

    return check


def check_finite_pixels(pixels) -> None:
    """The decoded image holds no nan or inf (a VAE that overflows in fp16 decodes finite latents to nan)."""
    import numpy as np
    import torch

    finite = torch.isfinite(pixels).all() if isinstance(pixels, torch.Tensor) else np.isfinite(pixels).all()
    if not finite:
        raise ValueError("decoding: the VAE produced nan or inf pixels; nothing was written (fp16 overflow? try dtype=fp32)")


def check_untiled_fits(pipe, family, plan: list[Stage], tiling: bool) -> None:
    """highres.tiled=false above the denoiser's own limit (SD3's positional embedding, read from the loaded
    weights' config: Family.untiled_limit) cannot run: say so before sampling."""
    if tiling:
        return
    limit = family.untiled_limit(pipe)
    largest = max(max(stage.width, stage.height) for stage in plan)
    if limit is not None and largest // pipe.vae_scale_factor > limit:
        raise ValueError(
            f"highres.tiled=false: this {family.name} model's positional embedding covers {limit * pipe.vae_scale_factor} px, "
            f"the chain reaches {largest} px; use highres.tiled=auto"
        )


def needs_tiling(highres, model, family_name: str, width: int, height: int) -> bool:
    tile, _ = tile_sizes(highres, model.native_size, family_name)
    vae_tile = highres.get("vae_tile_size") or tile
    latent = max(width, height) // 8
    return (highres.get("tiled", "auto") is not False and latent > tile) or (
        highres.get("vae_tiled", "auto") is not False and latent > vae_tile
    )


def _vae_options(pipe, highres, model, family_name: str):
    tile, _ = tile_sizes(highres, model.native_size, family_name)
    vae_tile = highres.get("vae_tile_size") or tile
    storage = None if highres.get("tile_device", "auto") == "auto" else highres.tile_device
    return highres.get("vae_tiled", "auto") is not False, vae_tile, storage


def decode(pipe, latents, highres, model, family_name: str):
    """Model-space latents -> PIL image, through the tiled VAE above one tile (and the safety checker if any)."""
    import torch

    from synth import tiled_vae

    vae = onload(pipe.vae)
    tiled, tile, storage = _vae_options(pipe, highres, model, family_name)
    z = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
    with torch.no_grad(), upcast(vae):
        z = z.to(vae.device, vae.dtype)
        if tiled and max(z.shape[-2:]) > tile:
            pixels = tiled_vae.decode(vae, z, tile, storage)
        else:
            pixels = vae.decode(z, return_dict=False)[0]
    pixels = pixels.to(torch.float32)
    check_finite_pixels(pixels)
    if getattr(pipe, "watermark", None) is not None:
        pixels = pipe.watermark.apply_watermark(pixels)
    denormalize = None
    if getattr(pipe, "safety_checker", None) is not None:
        pixels, nsfw = pipe.run_safety_checker(pixels, pixels.device, latents.dtype)
        denormalize = [not flag for flag in nsfw] if nsfw is not None else None
    return pipe.image_processor.postprocess(pixels, output_type="pil", do_denormalize=denormalize)[0]


def encode(pipe, image, highres, model, family_name: str):
    """PIL image -> model-space latents (the posterior mean), through the tiled VAE above one tile."""
    import torch

    from synth import tiled_vae

    vae = onload(pipe.vae)
    tiled, tile, storage = _vae_options(pipe, highres, model, family_name)
    pixels = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    with torch.no_grad(), upcast(vae):
        pixels = pixels.to(vae.device, vae.dtype)
        if tiled and max(pixels.shape[-2:]) // 8 > tile:
            mean = tiled_vae.encode(vae, pixels, tile, storage)
        else:
            mean = vae.encode(pixels).latent_dist.mean
    shift = vae.config.get("shift_factor") or 0.0
    return ((mean - shift) * vae.config.scaling_factor).to(pipe.dtype if hasattr(pipe, "dtype") else mean.dtype)


def onload(module):
    """module, moved to its execution device now if model CPU offload holds it on the CPU: the tiled VAE calls its
    layers directly, below the forward hook that would move it."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(module)
    return module


class upcast:
    """Run an fp16 VAE that asks for it (`force_upcast`, SDXL's) in fp32, as the diffusers pipelines do."""

    def __init__(self, vae):
        import torch

        self.vae = vae
        self.dtype = vae.dtype
        self.active = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)

    def __enter__(self):
        if self.active:
            import torch

            self.vae.to(torch.float32)

    def __exit__(self, *exc):
        if self.active:
            self.vae.to(self.dtype)
