"""Write the SD1.5 twin as one civitai-style single-file checkpoint (original CompVis/LDM key layout).

The inverse of diffusers' loaders/single_file_utils.py (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint) for SD1.x, written name by name.
"""

from pathlib import Path

# Diffusers -> original (CompVis/LDM) names.
UNET_TOP_LEVEL_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """Maps one diffusers SD1.x UNet key to its LDM name (without the model.diffusion_model. prefix)."""
    for name, ldm_name in UNET_TOP_LEVEL_TO_LDM.items():
        if key.startswith(name + "."):
            return ldm_name + key[len(name) :]
    parts = key.split(".")
    kind = parts[1] if parts[0] == "mid_block" else parts[2]  # resnets, attentions, downsamplers or upsamplers
    if parts[0] == "down_blocks":
        # LDM numbers input blocks flat: conv_in, then each block's layers followed by its downsampler.
        first = 1 + int(parts[1]) * (layers_per_block + 1)
        if kind == "downsamplers":
            return f"input_blocks.{first + layers_per_block}.0.op." + ".".join(parts[5:])
        prefix = f"input_blocks.{first + int(parts[3])}.{0 if kind == 'resnets' else 1}"
        rest = parts[4:]
    elif parts[0] == "mid_block":
        # middle_block is resnet, attention, resnet.
        prefix = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * int(parts[2])}"
        rest = parts[3:]
    elif parts[0] == "up_blocks":
        # Output blocks have one layer more per block; the upsampler sits in the block's last layer,
        # after its resnet and, where the block has one, its attention.
        first = int(parts[1]) * (layers_per_block + 1)
        if kind == "upsamplers":
            slot = 2 if int(parts[1]) in up_blocks_with_attention else 1
            return f"output_blocks.{first + layers_per_block}.{slot}." + ".".join(parts[4:])
        prefix = f"output_blocks.{first + int(parts[3])}.{0 if kind == 'resnets' else 1}"
        rest = parts[4:]
    else:
        raise ValueError(f"no LDM name for UNet key {key!r}")
    if kind == "resnets":
        rest = [UNET_RESNET_TO_LDM.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([prefix, *rest])


def _vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """Maps one diffusers AutoencoderKL key to its LDM name (without the first_stage_model. prefix)."""
    parts = key.split(".")
    coder = parts[0]
    if coder in ("quant_conv", "post_quant_conv") or parts[1] in ("conv_in", "conv_out"):
        return key
    if parts[1] == "conv_norm_out":
        return f"{coder}.norm_out.{parts[2]}"
    if parts[1] in ("down_blocks", "up_blocks"):
        block = int(parts[2])
        if coder == "decoder":
            block = num_blocks - 1 - block  # LDM numbers decoder blocks from the lowest resolution up
        stage = "down" if coder == "encoder" else "up"
        if parts[3] == "resnets":
            name = "nin_shortcut" if parts[5] == "conv_shortcut" else parts[5]
            return f"{coder}.{stage}.{block}.block.{parts[4]}.{name}.{parts[6]}"
        return f"{coder}.{stage}.{block}.{stage}sample.{'.'.join(parts[5:])}"
    if parts[1] == "mid_block" and parts[2] == "resnets":
        name = "nin_shortcut" if parts[4] == "conv_shortcut" else parts[4]
        return f"{coder}.mid.block_{int(parts[3]) + 1}.{name}.{parts[5]}"
    if parts[1] == "mid_block" and parts[2] == "attentions":
        name = ".".join(parts[4:-1])
        return f"{coder}.mid.attn_1.{VAE_ATTENTION_TO_LDM[name]}.{parts[-1]}"
    raise ValueError(f"no LDM name for VAE key {key!r}")


def save_single_file_sd15(twin_dir: str | Path, out_file: str | Path) -> Path:
    """Writes an SD1.x twin as one civitai-style .safetensors checkpoint in the original LDM key layout.

    ``StableDiffusionPipeline.from_single_file(out_file, config=str(twin_dir))`` loads it offline and
    gives the same pixels as ``from_pretrained(twin_dir)``.

    Args:
        twin_dir: An sd15 twin folder (see ensure_twin).
        out_file: The .safetensors file to write.

    Returns:
        ``out_file`` as a Path.
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipeline = StableDiffusionPipeline.from_pretrained(twin_dir, safety_checker=None)
    unet_config, vae_config = pipeline.unet.config, pipeline.vae.config
    up_blocks_with_attention = {i for i, kind in enumerate(unet_config.up_block_types) if "CrossAttn" in kind}

    checkpoint = {}
    for key, tensor in pipeline.unet.state_dict().items():
        ldm_key = _unet_key_to_ldm(key, unet_config.layers_per_block, up_blocks_with_attention)
        checkpoint["model.diffusion_model." + ldm_key] = tensor
    for key, tensor in pipeline.vae.state_dict().items():
        ldm_key = _vae_key_to_ldm(key, len(vae_config.block_out_channels))
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        checkpoint["first_stage_model." + ldm_key] = tensor
    for key, tensor in pipeline.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; the checkpoint keeps the text_model. level.
        checkpoint["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = tensor

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in checkpoint.items()}, out_file, metadata={"format": "pt"})
    return out_file
