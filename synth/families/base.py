"""What a model family declares: everything that differs between families, in one place per family.

A family is a subclass of `Family` in its own module of this package (sd15.py, sdxl.py, ...), registered in
synth/families/__init__.py, plus one config file in conf/model/. Shared code asks the family object and never
compares family names. Class and function references are "module:name" strings, resolved on use, so that
importing this package (for the input checks) imports neither torch nor diffusers.
"""

from __future__ import annotations

import importlib

NOISE, FLOW = "noise", "flow"  # prediction kinds: epsilon / v-prediction on a discrete schedule, or flow matching
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # how every diffusers denoiser names them


def resolve(reference: str):
    """The object a "module:name" string names."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


class Family:
    """The defaults every family starts from; a family module overrides what differs."""

    name: str
    text2img: str  # "module:Class" of the text-to-image pipeline
    img2img: str  # "module:Class" of the image-to-image pipeline
    controlnet_img2img: str | None = None  # "module:Class" of image-to-image with a ControlNet (highres refinement)
    size_step: int = 8  # width and height must be multiples of this: VAE factor 8 x the DiT patch size
    single_file: bool = False  # whether diffusers can load a civitai-style single-file checkpoint
    denoiser: str = "unet"  # the pipeline attribute holding the denoiser, and its LoRA state-dict prefix
    prediction: str = NOISE  # NOISE or FLOW: which schedulers fit (conf/scheduler/*.yaml `fits:`)
    objective: str  # "module:Class" of the training objective (a synth.train.objectives subclass)
    tiled_forward: str = "synth.tiled_denoiser:unet_forward"  # "module:function": the denoiser's forward over tiles
    twin_builder: str  # "module:function" building the random-weight twin (synth/twins.py calls it)
    default_lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS  # peft target_modules when lora.target_modules=null
    peft_loaded: bool = False  # LoRAs load through peft directly: the denoiser has no diffusers LoRA mixin
    # Textual inversion: (pipeline tokenizer attribute, encoder attribute, embedding-file key) per CLIP encoder.
    textual_inversion_targets: tuple[tuple[str, str, str], ...] = ()
    max_sequence_length_limit: int | None = None  # the pipeline's own limit on model.max_sequence_length, if it has one
    untiled_limit_px: int | None = None  # largest untiled side of the released weights (checked before loading)
    tile_step_reason: str = "the UNet halves the latent 3 times"  # why tile sizes are multiples of tile_step
    # Speed options (synth.accel): whether the denoiser's attention processors go through diffusers' attention
    # dispatcher (then accel.attention can choose a backend), and whether the denoiser has diffusers' cache hooks
    # (CacheMixin) with a text-to-image pipeline that sets their cache context (accel.cache=first_block).
    attention_dispatch: bool = False
    first_block_cache: bool = False
    # accel.compile=regional compiles these denoiser block classes; () = the diffusers class's own _repeated_blocks
    repeated_blocks: tuple[str, ...] = ()

    @property
    def clip_states_chunked(self) -> bool:
        """Whether the prompt embeddings carry CLIP's per-token states (77-token chunks for long prompts, A1111
        weights): the CLIP families' do; FLUX takes only CLIP-L's pooled output and says False."""
        return bool(self.textual_inversion_targets)

    @property
    def tile_step(self) -> int:
        """Tile sizes are multiples of this many latent pixels: 8 for UNets (three halvings), the patch size for DiTs."""
        return 8 if self.denoiser == "unet" else self.size_step // 8

    @property
    def tile_align(self) -> int:
        """Tile starts and sizes are multiples of this many latent pixels (a DiT's patch size)."""
        return self.size_step // 8

    def pipeline_class(self, task: str):
        """The diffusers pipeline class for task "text2img", "img2img" or "controlnet_img2img"."""
        return resolve(getattr(self, task))

    def objective_class(self):
        return resolve(self.objective)

    def tiled_forward_function(self):
        return resolve(self.tiled_forward)

    def build_twin(self, size, seed: int, scratch, **options):
        """The twin pipeline with seeded random weights (not saved); options: a variant's architecture
        (model.twin.options), passed to the builder."""
        return resolve(self.twin_builder)(size, seed, scratch, **options)

    def load_kwargs(self, model_cfg) -> dict:
        """Extra from_pretrained arguments the family needs."""
        return {}

    def call_kwargs(self, model_cfg, task: str, width: int, height: int) -> dict:
        """Extra pipeline-call arguments the family needs (height/width for text-to-image)."""
        return {"width": width, "height": height} if task == "text2img" else {}

    def img2img_steps(self, steps: int, strength: float) -> int:
        """How many denoising steps image-to-image runs: diffusers' UNet pipelines run floor(steps * strength)."""
        return min(int(steps * strength), steps)

    def encode_prompt(self, pipe, prompt: str, negative: str, guidance: bool, model_cfg) -> dict:
        """The pipeline-call arguments carrying the prompt. By default the pipeline reads the text itself."""
        from synth.prompt_encoding import plain_text

        return {"prompt": plain_text(prompt), "negative_prompt": plain_text(negative) or None}

    def check_embedding(self, embedding) -> None:
        """Refuse a textual-inversion embedding this family cannot take whole (see synth.textual_inversion)."""

    def check_model(self, cfg) -> None:
        """Refuse the family's own model.* settings in the infer config cfg, before anything loads."""

    def check_loaded(self, pipe, model_cfg) -> None:
        """Refuse model.* settings the loaded weights cannot honour (read from their config), before sampling."""

    def check_train(self, cfg) -> None:
        """Family-specific training checks (synth.train.run.check_train_inputs), before anything loads."""

    def pipeline_latents(self, pipe, latents, width: int, height: int):
        """The (batch, channels, height / 8, width / 8) model-space latents of a pipeline call with
        output_type="latent" at width x height (the high-res chain upscales and refines these); a family whose
        pipelines return them in another layout (FLUX's packed tokens) converts them here."""
        return latents

    def untiled_limit(self, pipe) -> int | None:
        """The largest latent side the loaded denoiser can run untiled, from the weights' config; None = no limit."""
        return None

    # A1111 / Forge infotext: the field each guidance setting is written to, and the config key it reads back into
    a1111_guidance_fields: dict[str, str] = {"CFG scale": "guidance_scale"}

    # LoRA import
    kohya_in_diffusers: bool = False  # diffusers' load_lora_weights converts this family's plain kohya LoRA files
    lora_markers: tuple[str, ...] = ()  # key fragments typical of LoRA files made for this family (to name it)

    @property
    def lora_prefixes(self) -> tuple[tuple[str, str], ...]:
        """(file key prefix, pipeline component) pairs LoRA files use: diffusers' dotted prefixes, kohya's
        underscore ones. A prefix ending in "_" means kohya names (the module path with "_" for ".")."""
        return (
            (f"{self.denoiser}.", self.denoiser), ("lora_unet_", self.denoiser), (f"lora_{self.denoiser}_", self.denoiser),
            ("text_encoder.", "text_encoder"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
        )

    def lora_module_targets(self, component: str, name: str, underscored: bool, model) -> list[tuple[str, int, int]]:
        """The (layer name, chunk, chunks) a LoRA file's module name patches in the component: the name itself
        by default; a family rewrites its original checkpoint names, and splits a fused layer (qkv) into its
        diffusers layers, each taking one chunk of the delta's rows."""
        return [(name, 0, 1)]

    # LoRA export
    lora_export_form: str = "kohya"  # synth.lora_export form of lora.<tag>.safetensors, the file ComfyUI / A1111 read
    ss_base_model_version: str = ""  # kohya sd-scripts' ss_base_model_version (A1111's extra-networks panel)
    modelspec_architecture: str = ""  # SAI model spec architecture ("<this>/lora" in modelspec.architecture)
    lora_fused_layers: dict = {}  # "official_fused" form: diffusers layer -> (original fused layer, position, members)
