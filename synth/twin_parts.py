"""The parts every family's twin builder shares: presets and sizes, seeding, VAE, CLIP and T5 encoders, tokenizers.

The builders themselves live with their families (synth/families/<family>.py: build_twin); synth.twins builds,
saves and caches twins.
"""

import zlib
from dataclasses import dataclass

import torch

from synth.twin_tokenizers import (  # noqa: F401  (CAPTIONS and the trainers are used by other twin builders)
    CAPTIONS,
    _sentencepiece_model,
    build_bert_tokenizer,
    build_chatglm_tokenizer,
    build_clip_tokenizer,
    build_t5_tokenizer,
)

PRESETS = ("tiny", "small")



@dataclass(frozen=True)
class TwinSize:
    """Widths and depths of one preset; every family builds from these."""

    unet_channels: tuple[int, ...]  # SD1.5 UNets use all four blocks, SDXL/Kolors UNets the first three
    layers_per_block: int  # resnets per UNet/VAE block (the real models use 2)
    vae_channels: tuple[int, ...]  # four blocks, three downsamples: the real 8x spatial scale
    text_width: int  # CLIP-L, BERT and ChatGLM stand-ins
    wide_text_width: int  # CLIP-G and T5 stand-ins, wider like the real ones
    text_layers: int  # at least two, so the "penultimate hidden state" several pipelines use is not the last
    dit_width: int  # SD3 / Hunyuan-DiT transformer width
    dit_layers: int  # even, so Hunyuan-DiT's long skip connections are exercised
    sample_size: int  # default latent size: an unset height stays cheap on a twin


SIZES = {
    # Fast tests: a 2-step 64 px image per family in well under a second.
    "tiny": TwinSize(
        unet_channels=(32, 64, 64, 64),
        layers_per_block=1,
        vae_channels=(32, 32, 64, 64),
        text_width=32,
        wide_text_width=64,
        text_layers=2,
        dit_width=32,
        dit_layers=4,
        sample_size=8,
    ),
    # Benchmarks: SD1.5-shaped and big enough that compute dominates per-step overheads.
    "small": TwinSize(
        unet_channels=(64, 128, 256, 256),
        layers_per_block=2,
        vae_channels=(32, 64, 128, 128),
        text_width=64,
        wide_text_width=128,
        text_layers=4,
        dit_width=128,
        dit_layers=8,
        sample_size=32,
    ),
}

# One attention head per 16 channels; UNet configs spell the head count "attention_head_dim" (legacy naming).
CHANNELS_PER_HEAD = 16


def seed_component(seed: int, component: str) -> None:
    """Seeds torch per component, so each component's weights depend only on (seed, name)."""
    torch.manual_seed(zlib.crc32(f"{seed}/{component}".encode()))




# --- shared components ------------------------------------------------------------------------


def build_vae(size: TwinSize, **family_config):
    """Builds an AutoencoderKL with four blocks (8x downscale); the family passes latent channels and scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=size.vae_channels,
        layers_per_block=size.layers_per_block,
        sample_size=size.sample_size * 8,
        **family_config,
    )


def build_clip_text_encoder(tokenizer, width: int, layers: int, big: bool, with_projection: bool):
    """Builds a CLIP text encoder; ``big`` picks OpenCLIP-G's gelu over CLIP-L's quick_gelu."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=width // CHANNELS_PER_HEAD,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu" if big else "quick_gelu",
        projection_dim=width,  # the real projections keep the width (768 for L, 1280 for G)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def build_t5_encoder(tokenizer, width: int, layers: int):
    """Builds a T5 v1.1 / mT5-style encoder (gated-gelu feed-forward, untied embeddings)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=CHANNELS_PER_HEAD,
        d_ff=width * 2,
        num_layers=layers,
        num_heads=width // CHANNELS_PER_HEAD,
        feed_forward_proj="gated-gelu",  # T5 v1.1 and mT5, as used by SD3 and Hunyuan-DiT
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def build_sdxl_unet(size: TwinSize, cross_attention_dim: int, pooled_dim: int, **family_config):
    """Builds an SDXL-shaped UNet: three blocks, attention in the lower two, text_time add-embeddings."""
    from diffusers import UNet2DConditionModel

    channels = size.unet_channels[:3]
    time_embed_dim = 8  # the real 256 per size/crop number; 8 keeps the add-embedding small
    return UNet2DConditionModel(
        sample_size=size.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=size.layers_per_block,
        transformer_layers_per_block=(1, 1, 2),  # deeper at the bottom, like the real (1, 2, 10)
        attention_head_dim=tuple(c // CHANNELS_PER_HEAD for c in channels),
        use_linear_projection=True,  # SDXL's transformers project with linear layers, SD1.5's with 1x1 convs
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding + six size/crop numbers (original size, crop corner, target size)
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
        **family_config,
    )
