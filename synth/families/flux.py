"""FLUX.1 [dev] and [schnell] (black-forest-labs/FLUX.1-dev, FLUX.1-schnell): a rectified-flow transformer with
double-stream (MMDiT) and single-stream blocks over 2x2-packed latent tokens, rotary position ids (img_ids/txt_ids),
CLIP-L (pooled only) and T5-XXL text encoders, and a 16-channel VAE.

[dev] is guidance-distilled: `guidance_scale` feeds the transformer's guidance embedding (one pass per step, no
classifier-free guidance). A negative prompt needs FluxPipeline's true CFG (model.true_cfg_scale > 1: a second pass
per step); with true_cfg_scale 1 synth refuses a negative prompt instead of ignoring it. [schnell] has no guidance
embedder: guidance_scale does nothing there. Both are configs of this family (conf/model/flux_dev.yaml,
flux_schnell.yaml).

The pipelines return packed latents for output_type="latent"; `pipeline_latents` unpacks them for the high-res
chain, and the tiled forward unpacks the transformer's tokens into a grid so that each tile is cut, given the
position ids of its own rows and columns, and packed again.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from synth.families.base import FLOW, Family
from synth.train.objectives import FlowMatching

if TYPE_CHECKING:
    from synth.twin_parts import TwinSize

PATCH = 2  # FLUX packs 2x2 latent pixels into one token


class Flux(Family):
    name = "flux"
    text2img = "diffusers:FluxPipeline"
    img2img = "diffusers:FluxImg2ImgPipeline"
    size_step = 16  # VAE factor 8 x the 2x2 packing (FluxPipeline's vae_scale_factor * 2)
    single_file = True  # BFL's transformer-only files (flux1-dev.safetensors), read by load_single_file
    denoiser = "transformer"
    prediction = FLOW
    objective = "synth.families.flux:Objective"
    tiled_forward = "synth.families.flux:tiled_forward"
    twin_builder = "synth.families.flux:build_twin"
    # add add_q_proj, add_k_proj, add_v_proj, to_add_out (text stream) or proj_mlp, proj_out to lora.target_modules
    textual_inversion_targets = (("tokenizer", "text_encoder", "clip_l"),)  # CLIP-L: SD1.x's embeddings fit
    max_sequence_length_limit = 512  # T5's, as FluxPipeline takes it
    untiled_limit_px = None  # rotary position ids have no table to run out of
    tile_step_reason = "the 2x2 token packing"
    clip_states_chunked = False  # CLIP-L gives only its pooled output: no chunks, no weights
    attention_dispatch = True  # FluxAttnProcessor calls diffusers' dispatch_attention_fn
    first_block_cache = True  # FluxTransformer2DModel is a CacheMixin; FluxPipeline sets cache contexts

    def call_kwargs(self, model_cfg, task, width, height) -> dict:
        # FluxImg2ImgPipeline defaults its size to the transformer's sample size, not the image's (like SD3's).
        return {"width": width, "height": height, "max_sequence_length": int(model_cfg.get("max_sequence_length", 512)),
                "true_cfg_scale": float(model_cfg.get("true_cfg_scale", 1.0))}

    def img2img_steps(self, steps: int, strength: float) -> int:
        # FluxImg2ImgPipeline skips int(steps - steps * strength) steps, as SD3's does.
        return steps - int(max(steps - steps * strength, 0))

    def check_model(self, cfg) -> None:
        """model.true_cfg_scale >= 1; a negative prompt only with true CFG (FluxPipeline ignores it at 1)."""
        scale = cfg.model.get("true_cfg_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale < float("inf"):
            raise ValueError(f"model.true_cfg_scale={scale}: must be a finite number >= 1 (1 = no true CFG)")
        if cfg.get("negative_prompt") and scale == 1:
            raise ValueError(f"negative_prompt={cfg.negative_prompt!r}: FLUX uses a negative prompt only with true "
                             "classifier-free guidance; set model.true_cfg_scale above 1 (e.g. 4.0, two passes per "
                             "step) or drop negative_prompt")

    def encode_prompt(self, pipe, prompt, negative, guidance, model_cfg) -> dict:
        """CLIP-L's pooled output and T5's states (FluxPipeline.encode_prompt). CLIP-L gives only its pooled
        output, of the first 77 tokens (synth's chunks would add nothing to it, and weights do not reach a pooled
        vector); both encoders read the text without weighting syntax, CLIP-L with textual-inversion keywords
        expanded. T5 keeps model.max_sequence_length (up to 512) tokens."""
        import torch

        from synth.prompt_encoding import plain_text
        from synth.textual_inversion import expand

        max_length = int(model_cfg.get("max_sequence_length", 512))
        device = pipe._execution_device

        def encode(text: str):
            with torch.no_grad():
                pooled = pipe._get_clip_prompt_embeds(prompt=plain_text(expand(text, pipe.tokenizer)), device=device)
                t5 = pipe._get_t5_prompt_embeds(prompt=plain_text(text), max_sequence_length=max_length, device=device)
            return t5, pooled

        call = dict(zip(("prompt_embeds", "pooled_prompt_embeds"), encode(prompt)))
        if float(model_cfg.get("true_cfg_scale", 1.0)) > 1 and negative:
            call["negative_prompt_embeds"], call["negative_pooled_prompt_embeds"] = encode(negative)
        return call

    def pipeline_latents(self, pipe, latents, width: int, height: int):
        """FluxPipeline's output_type="latent" is packed tokens (batch, tokens, 64): unpacked to (batch, 16, h, w)."""
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    # Forge writes FLUX's embedded guidance as "Distilled CFG Scale" and the true CFG as "CFG scale"
    a1111_guidance_fields = {"CFG scale": "model.true_cfg_scale", "Distilled CFG Scale": "guidance_scale"}

    def load_single_file(self, cls, path: str, model_cfg, kwargs: dict):
        """A BFL-layout transformer file (flux1-dev.safetensors) with the other components from
        model.single_file_config (see load_bfl_transformer for why synth converts it itself)."""
        transformer = load_bfl_transformer(path, str(model_cfg.single_file_config), kwargs["dtype"])
        local = {"use_safetensors": True} if Path(str(model_cfg.single_file_config)).expanduser().exists() else {}
        return cls.from_pretrained(str(model_cfg.single_file_config), transformer=transformer, **local, **kwargs)

    # LoRA import: diffusers/peft files through diffusers' Flux loader; kohya / ComfyUI files in BFL's names are
    # renamed (BFL_* tables) and then loaded by diffusers' loader too; DoRA, LoHa/LoKr and text-encoder layers merge.
    lora_markers = ("double_blocks", "single_blocks", "single_transformer_blocks")  # BFL names: kohya's FLUX LoRAs
    lora_renamed_for_diffusers = True

    @property
    def lora_prefixes(self):
        # kohya sd-scripts' FLUX LoRAs: lora_unet_ (BFL names), lora_te1_ (CLIP-L), lora_te3_ (T5; lora_te2_ in its
        # first FLUX releases); ComfyUI's: diffusion_model. (BFL names), text_encoders.clip_l/t5xxl.transformer.
        return (*super().lora_prefixes, ("diffusion_model.", self.denoiser), ("lora_te2_", "text_encoder_2"),
                ("lora_te3_", "text_encoder_2"), ("text_encoder_2.", "text_encoder_2"),
                ("text_encoders.clip_l.transformer.", "text_encoder"),
                ("text_encoders.t5xxl.transformer.", "text_encoder_2"))

    def lora_module_targets(self, component, name, underscored, model):
        """BFL's names (double_blocks.N.img_attn.qkv, single_blocks.N.linear1, final_layer.linear, ...; kohya's with
        "_" for ".") as diffusers' layers: a fused layer's rows are its members' rows stacked (linear1: q, k, v of
        inner rows each, then proj_mlp's 4 x inner). Other names are diffusers' own."""
        members = bfl_members(name, underscored) if component == self.denoiser else None
        if members is None:
            return [(name, 0, 1)]
        separator = "_" if underscored else "."
        return [(layer.replace(".", separator), part, parts) for layer, part, parts in members]

    # LoRA export: lora.kohya.safetensors in BFL's names (kohya sd-scripts' FLUX LoRAs, civitai's), which ComfyUI and
    # diffusers' Flux loader read; lora.comfyui.safetensors is not written (ComfyUI reads the kohya file).
    lora_export_form = "kohya_fused"
    ss_base_model_version = "flux1"  # what sd-scripts' FLUX branch writes
    modelspec_architecture = "flux-1-dev"

    def lora_original_layers(self, modules) -> dict:
        """The kohya_fused form's plan: BFL module -> its members (diffusers module, part, parts, rows) in row order,
        for the BFL modules the LoRA's modules (diffusers module -> its rows) belong to. A member the LoRA does not
        train gets its rows from the others (FLUX's projections are all inner rows, proj_mlp MLP_RATIO x)."""
        plan = {}
        for module in modules:
            original = bfl_name(module)
            if original is None:
                raise ValueError(f"{module}: FLUX's original (BFL) model has no layer for it; the LoRA cannot be "
                                 "written in kohya's FLUX names")
            if original in plan:
                continue
            members = bfl_members(original, underscored=False)
            unit = next(modules[layer] // parts // member_weight(layer) for layer, _, parts in members if layer in modules)
            plan[original] = [(layer, part, parts, unit * member_weight(layer)) for layer, part, parts in members]
        return plan

    def lora_original_members(self, name, rows):
        """A kohya BFL name's members with their rows, from the LoRA's rows (q, k, v: 1 unit each, proj_mlp 4)."""
        members = bfl_members(name, underscored=True)
        if members is None:
            return None
        unit = rows // sum(member_weight(layer) for layer, _, _ in members)
        return [(layer, part, parts, unit * member_weight(layer)) for layer, part, parts in members]


# --- BFL's names (black-forest-labs/flux, ComfyUI, kohya's FLUX LoRAs): one table for LoRA files, the kohya export
# and single-file checkpoints. A BFL layer's rows are its diffusers members' rows stacked in this order; a member is
# a diffusers layer, or (layer, part, parts): the part-th of its rows cut in `parts` equal blocks. Each table is
# diffusers' convert_flux_transformer_checkpoint_to_diffusers (loaders/single_file_utils.py), read as names. ---

BFL_DOUBLE = {  # double_blocks.<i>.<this> -> transformer_blocks.<i>.<members>
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),  # shift, scale, gate x 2 in both
    "img_attn.norm.query_norm": ("attn.norm_q",), "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",), "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
BFL_SINGLE = {  # single_blocks.<i>.<this> -> single_transformer_blocks.<i>.<members>
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # inner, inner, inner, MLP_RATIO x inner rows
    "linear2": ("proj_out",), "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",), "norm.key_norm": ("attn.norm_k",),
}
BFL_TOP = {
    "img_in": ("x_embedder",), "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    # BFL's final adaLN gives (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)
    "final_layer.adaLN_modulation.1": (("norm_out.linear", 1, 2), ("norm_out.linear", 0, 2)),
}
BLOCKS = (("double_blocks", "transformer_blocks", BFL_DOUBLE), ("single_blocks", "single_transformer_blocks", BFL_SINGLE))
MLP_RATIO = 4  # FluxTransformer2DModel's single blocks: proj_mlp has 4 x inner rows (not in its config)
BFL_NORM_SUFFIX = "_norm"  # BFL's RMSNorms (query_norm, key_norm) store "scale" where diffusers' store "weight"


def _members(members) -> tuple[tuple[str, int, int], ...]:
    return tuple(member if isinstance(member, tuple) else (member, 0, 1) for member in members)


@lru_cache(maxsize=None)
def _lookups():
    """The tables keyed by BFL name (dotted and kohya's underscored) and inverted, by diffusers module."""
    by_name = {False: {}, True: {}}
    for table in (BFL_TOP, BFL_DOUBLE, BFL_SINGLE):
        for name in table:
            by_name[False][(id(table), name)] = name
            by_name[True][(id(table), name.replace(".", "_"))] = name
    inverse = {id(table): {layer: name for name, members in table.items() for layer, _, _ in _members(members)}
               for table in (BFL_TOP, BFL_DOUBLE, BFL_SINGLE)}
    return by_name, inverse


def bfl_members(name: str, underscored: bool) -> tuple[tuple[str, int, int], ...] | None:
    """The diffusers members (layer, part, parts) of a BFL layer name (kohya's form when underscored), or None."""
    by_name, _ = _lookups()
    separator = "_" if underscored else "."
    match = re.fullmatch(rf"(double_blocks|single_blocks){re.escape(separator)}(\d+){re.escape(separator)}(.+)", name)
    if match is None:
        original = by_name[underscored].get((id(BFL_TOP), name))
        return None if original is None else _members(BFL_TOP[original])
    kind, block, inner = match.groups()
    _, diffusers_block, table = next(entry for entry in BLOCKS if entry[0] == kind)
    original = by_name[underscored].get((id(table), inner))
    if original is None:
        return None
    return tuple((f"{diffusers_block}.{block}.{layer}", part, parts) for layer, part, parts in _members(table[original]))


def bfl_name(module: str) -> str | None:
    """The BFL layer (dotted) a diffusers module of FluxTransformer2DModel belongs to, or None."""
    _, inverse = _lookups()
    for kind, diffusers_block, table in BLOCKS:
        match = re.fullmatch(rf"{diffusers_block}\.(\d+)\.(.+)", module)
        if match and match.group(2) in inverse[id(table)]:
            return f"{kind}.{match.group(1)}.{inverse[id(table)][match.group(2)]}"
    return inverse[id(BFL_TOP)].get(module)


def member_weight(layer: str) -> int:
    """A fused layer's member rows in units of one attention projection's."""
    return MLP_RATIO if layer.endswith("proj_mlp") else 1


def bfl_layer_names(num_layers: int, num_single_layers: int) -> list[str]:
    """Every BFL layer of a transformer with these block counts (the guidance embedder's included)."""
    names = list(BFL_TOP)
    for (kind, _, table), count in zip(BLOCKS, (num_layers, num_single_layers)):
        names += [f"{kind}.{block}.{name}" for block in range(count) for name in table]
    return names


def _parameters(original: str) -> tuple[tuple[str, str], ...]:
    """(BFL parameter, diffusers parameter) pairs of a BFL layer."""
    return (("scale", "weight"),) if original.endswith(BFL_NORM_SUFFIX) else (("weight", "weight"), ("bias", "bias"))


def to_bfl_state_dict(state_dict: dict, num_layers: int, num_single_layers: int) -> dict:
    """A FluxTransformer2DModel state dict in BFL's layout (as flux1-dev.safetensors holds it): the inverse of
    diffusers' convert_flux_transformer_checkpoint_to_diffusers. Every tensor is placed, or this raises."""
    import torch

    out, used = {}, set()
    for original in bfl_layer_names(num_layers, num_single_layers):
        for bfl_param, param in _parameters(original):
            pieces = []
            for layer, part, parts in bfl_members(original, underscored=False):
                key = f"{layer}.{param}"
                if key not in state_dict:
                    break
                rows = state_dict[key].shape[0] // parts
                pieces.append(state_dict[key][part * rows:(part + 1) * rows])
                used.add(key)
            else:
                out[f"{original}.{bfl_param}"] = torch.cat(pieces).contiguous()
    left = sorted(set(state_dict) - used)
    if left:
        raise ValueError(f"{left[0]}: no BFL name for this FLUX transformer weight ({len(left)} left over)")
    return out


def from_bfl_state_dict(checkpoint: dict, shapes: dict, num_layers: int, num_single_layers: int, where: str) -> dict:
    """A BFL-layout FLUX transformer checkpoint (keys bare or under model.diffusion_model.) as diffusers'
    FluxTransformer2DModel state dict of the given shapes: fused layers split by their members' rows. A tensor
    of no BFL layer, a missing one or a wrong shape is refused, naming it."""
    tensors = {key.removeprefix("model.diffusion_model."): value for key, value in checkpoint.items()}
    out, used = {}, set()
    for original in bfl_layer_names(num_layers, num_single_layers):
        for bfl_param, param in _parameters(original):
            key = f"{original}.{bfl_param}"
            members = bfl_members(original, underscored=False)
            if f"{members[0][0]}.{param}" not in shapes:
                continue  # [schnell] has no guidance embedder
            if key not in tensors:
                raise ValueError(f"{where}: has no tensor {key!r}; it is not a FLUX.1 transformer of this config's "
                                 f"size ({num_layers} double, {num_single_layers} single blocks)")
            tensor, start = tensors[key], 0
            used.add(key)
            rows = [shapes[f"{layer}.{param}"][0] // parts for layer, _, parts in members]
            if tensor.shape[0] != sum(rows):
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, which does not fit this "
                                 f"config's transformer ({sum(rows)} rows); model.single_file_config is for another "
                                 "model size")
            for (layer, part, parts), count in zip(members, rows):
                out.setdefault(f"{layer}.{param}", [None] * parts)[part] = tensor[start:start + count]
                start += count
    left = sorted(set(tensors) - used)
    if left:
        raise ValueError(f"{where}: {len(left)} tensors are not FLUX.1 transformer weights in BFL's layout (e.g. "
                         f"{left[0]!r}); synth reads transformer-only files such as flux1-dev.safetensors, with the "
                         "VAE and text encoders from model.single_file_config")
    import torch

    return {key: parts[0] if len(parts) == 1 else torch.cat(parts) for key, parts in out.items()}


def load_bfl_transformer(path: str, config: str, dtype):
    """FluxTransformer2DModel from a BFL-layout file, with its config from the diffusers folder or hub id `config`.

    diffusers' FluxTransformer2DModel.from_single_file converts BFL files with FLUX.1's width written in
    (convert_flux_transformer_checkpoint_to_diffusers splits linear1 at 3072 rows), so it reads no transformer of
    another width; synth converts with the config's own shapes (the BFL_* tables) and hands diffusers' loader the
    converted state dict, which it loads as it is."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    model_config = FluxTransformer2DModel.load_config(config, subfolder="transformer")
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in
                  FluxTransformer2DModel.from_config(model_config).state_dict().items()}
    with safe_open(path, framework="pt") as file:
        checkpoint = {key: file.get_tensor(key) for key in file.keys()}
    state_dict = from_bfl_state_dict(checkpoint, shapes, model_config["num_layers"], model_config["num_single_layers"],
                                     f"model.path={path}")
    return FluxTransformer2DModel.from_single_file(state_dict, config=config, subfolder="transformer",
                                                   torch_dtype=dtype)


def save_single_file_flux(twin_dir: str | Path, out_file: str | Path) -> Path:
    """Write a FLUX folder's transformer as one BFL-layout .safetensors file (what flux1-dev.safetensors holds),
    for model.path=<file> model.single_file_config=<the folder>."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    transformer = FluxTransformer2DModel.from_pretrained(twin_dir, subfolder="transformer")
    tensors = to_bfl_state_dict(transformer.state_dict(), transformer.config.num_layers,
                                transformer.config.num_single_layers)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_file, metadata={"format": "pt"})
    return out_file


def tiled_forward(model, original, settings, stats, hidden_states, *args, img_ids=None, **kwargs):
    """FluxTransformer2DModel.forward over tiles of the token grid, each tile with the img_ids of its own absolute
    rows and columns, so that RoPE sees where the tile sits in the whole image.

    The transformer takes one img_ids for its whole batch, so tiles at different places cannot share a call:
    each call carries one tile (with the pipeline's whole batch); highres.tile_batch_size does not batch them.
    """
    import torch

    from synth.tiled_denoiser import count_tiles, refuse_residuals, transformer_output
    from synth.tiling import tile_layout, tiled_apply

    refuse_residuals(kwargs)
    return_dict = kwargs.pop("return_dict", True)
    if img_ids.ndim == 3:  # diffusers' deprecated batched form
        img_ids = img_ids[0]
    rows, columns = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
    batch, _, channels = hidden_states.shape
    grid = hidden_states.reshape(batch, rows, columns, channels).permute(0, 3, 1, 2)  # tokens are row-major
    ids = img_ids.reshape(rows, columns, img_ids.shape[-1])
    tile, overlap = settings.tile_size // PATCH, settings.tile_overlap // PATCH  # latent pixels -> tokens
    tiles = tile_layout(rows, columns, tile, min(overlap, tile - 1))
    count_tiles(stats, tiles, 1)

    def run(chunk, crops):
        out = []
        for tile_, crop in zip(chunk, crops.chunk(len(chunk))):
            tokens = crop.permute(0, 2, 3, 1).reshape(batch, -1, channels)
            tile_ids = ids[(*tile_.slices(),)].reshape(-1, ids.shape[-1])
            pred = original(tokens, *args, img_ids=tile_ids, **kwargs, return_dict=False)[0]
            out.append(pred.reshape(batch, tile_.height, tile_.width, -1).permute(0, 3, 1, 2))
        return torch.cat(out)

    out = tiled_apply(run, grid, tiles, overlap, 1)
    return transformer_output(out.permute(0, 2, 3, 1).reshape(batch, rows * columns, -1), return_dict)


# --- the training objective (synth/train/objectives.py holds the machinery) ---


class Objective(FlowMatching):
    """FLUX: flow matching on packed latents, conditioned on T5 states and CLIP-L's pooled output, with the
    shifted logit-normal timesteps of diffusers' train_dreambooth_lora_flux.py (FlowMatching's, shift from the
    weights' scheduler: 3.0 for [dev]). [dev]'s guidance embedding gets objective.guidance_scale, as at inference."""

    num_text_encoders = 2

    def encode_text(self, prompts, device) -> dict:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=[p[0] for p in prompts], prompt_2=[p[1] for p in prompts], device=device, num_images_per_prompt=1,
            max_sequence_length=int(self.cfg.get("max_sequence_length") or 512),
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        import torch

        pipe = self.pipe
        size, (height, width) = noisy.shape[0], noisy.shape[-2:]
        packed = pipe._pack_latents(noisy, size, noisy.shape[1], height, width)
        img_ids = pipe._prepare_latent_image_ids(size, height // PATCH, width // PATCH, noisy.device, noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            scale = self.cfg.get("guidance_scale")  # conf/train.yaml: model.guidance_scale
            guidance = torch.full((size,), 3.5 if scale is None else float(scale), device=noisy.device,
                                  dtype=noisy.dtype)
        pred = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # the pipeline passes sigmas
            guidance=guidance,
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            pooled_projections=cond["pooled_projections"].to(noisy.dtype),
            txt_ids=cond["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(pred, height * scale, width * scale, scale)


# --- the offline twin (synth.twins builds and caches it; the parts are synth.twin_parts) ---


def build_twin(size: TwinSize, seed: int, scratch: Path, guidance_embeds: bool = True, dynamic_shifting: bool = True):
    """FLUX: CLIP-L (pooled) + T5, a transformer with double- and single-stream blocks over 2x2-packed tokens,
    16-channel VAE with FLUX's scale and shift, flow matching.

    guidance_embeds: [dev]'s guidance embedder ([schnell] has none); dynamic_shifting: [dev]'s resolution-dependent
    timestep shift (FluxPipeline passes mu); [schnell] runs unshifted.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from synth.twin_parts import (
        CHANNELS_PER_HEAD,
        build_clip_text_encoder,
        build_clip_tokenizer,
        build_t5_encoder,
        build_t5_tokenizer,
        build_vae,
        seed_component,
    )

    tokenizer = build_clip_tokenizer(scratch / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(scratch / "tokenizer_2", model_max_length=512)  # T5's context
    clip_width, t5_width = size.text_width, size.wide_text_width
    seed_component(seed, "text_encoder")
    text_encoder = build_clip_text_encoder(tokenizer, clip_width, size.text_layers, big=False, with_projection=False)
    seed_component(seed, "text_encoder_2")
    text_encoder_2 = build_t5_encoder(tokenizer_2, t5_width, size.text_layers)
    seed_component(seed, "transformer")
    # The real model: 19 double-stream and 38 single-stream blocks, heads of 128 channels split (16, 56, 56)
    # over the rotary axes (text index, row, column); here half the layers of each kind, heads of 16 as (4, 6, 6).
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * PATCH * PATCH,
        num_layers=size.dit_layers // 2,
        num_single_layers=size.dit_layers // 2,
        attention_head_dim=CHANNELS_PER_HEAD,
        num_attention_heads=size.dit_width // CHANNELS_PER_HEAD,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    seed_component(seed, "vae")
    # FLUX's VAE: 16 latent channels, its published scale and shift, no quant convs.
    vae = build_vae(size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False)
    if dynamic_shifting:  # black-forest-labs/FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    else:  # black-forest-labs/FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
