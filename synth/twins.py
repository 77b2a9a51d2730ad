"""Random-weight tiny twins of every model family synth supports, built offline.

A twin is an ordinary diffusers pipeline folder (``model_index.json`` plus one
subfolder per component) with the real family's structure, latent channels,
scheduler and tokenizer types, but small widths, few layers and random weights.
Twins load through the same ``from_pretrained`` call as real weights, so tests
and benchmarks exercise synth's real code paths without the Hugging Face hub.

Tokenizers are trained here on a built-in caption corpus of English and Chinese,
so common words ("a", "photo", "dog") are real tokens of the CLIP, BERT and
ChatGLM vocabularies rather than byte or character fallbacks.
"""

import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from synth.single_file import save_single_file_sd15  # noqa: F401  (part of this module's API)
from synth.twin_tokenizers import (  # noqa: F401  (CAPTIONS and the trainers are used by other twin builders)
    CAPTIONS,
    _bert_tokenizer,
    _chatglm_tokenizer,
    _clip_tokenizer,
    _sentencepiece_model,
    _t5_tokenizer,
)

from synth.families import FAMILIES  # noqa: E402  (each family names its builder: Family.twin_builder)
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


def _check_choice(family: str, preset: str) -> None:
    """Refuses an unknown family or preset with a message naming the allowed ones."""
    if family not in FAMILIES:
        raise ValueError(f"unknown twin family {family!r}; choose one of {tuple(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown twin preset {preset!r}; choose one of {PRESETS}")


def _seed(seed: int, component: str) -> None:
    """Seeds torch per component, so each component's weights depend only on (seed, name)."""
    torch.manual_seed(zlib.crc32(f"{seed}/{component}".encode()))




# --- shared components ------------------------------------------------------------------------


def _vae(size: TwinSize, **family_config):
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


def _clip_text_encoder(tokenizer, width: int, layers: int, big: bool, with_projection: bool):
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


def _t5_encoder(tokenizer, width: int, layers: int):
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


def _sdxl_unet(size: TwinSize, cross_attention_dim: int, pooled_dim: int, **family_config):
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


# --- families ---------------------------------------------------------------------------------


def _build_sd15(size: TwinSize, seed: int, scratch: Path):
    """SD1.5: CLIP-L, four-block UNet with attention in the top three, PNDM."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer(scratch / "tokenizer")
    _seed(seed, "text_encoder")
    text_encoder = _clip_text_encoder(tokenizer, size.text_width, size.text_layers, big=False, with_projection=False)
    _seed(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=size.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        attention_head_dim=tuple(c // CHANNELS_PER_HEAD for c in size.unet_channels),
        cross_attention_dim=size.text_width,
    )
    _seed(seed, "vae")
    vae = _vae(size, latent_channels=4, scaling_factor=0.18215)  # SD1.x VAE scaling
    # runwayml/stable-diffusion-v1-5 scheduler: scaled_linear 0.00085-0.012 over 1000 steps,
    # PRK warm-up skipped, final alpha not forced to 1, timesteps offset by one.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,  # its CLIP vision model would dwarf the twin and has no offline stand-in
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(size: TwinSize, seed: int, scratch: Path):
    """SDXL (and SDXL-Turbo): CLIP-L + OpenCLIP-G with projection, text_time UNet, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = _clip_tokenizer(scratch / "tokenizer")
    tokenizer_2 = _clip_tokenizer(scratch / "tokenizer_2", pad_token="!")
    _seed(seed, "text_encoder")
    text_encoder = _clip_text_encoder(tokenizer, size.text_width, size.text_layers, big=False, with_projection=False)
    _seed(seed, "text_encoder_2")
    text_encoder_2 = _clip_text_encoder(
        tokenizer_2, size.wide_text_width, size.text_layers, big=True, with_projection=True
    )
    _seed(seed, "unet")
    unet = _sdxl_unet(
        size, cross_attention_dim=size.text_width + size.wide_text_width, pooled_dim=size.wide_text_width
    )
    _seed(seed, "vae")
    vae = _vae(size, latent_channels=4, scaling_factor=0.13025, force_upcast=True)  # SDXL VAE overflows in fp16
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler: scaled_linear 0.00085-0.012, "leading" spacing, offset 1.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def _build_sd3(size: TwinSize, seed: int, scratch: Path):
    """SD3: CLIP-L + CLIP-G (both projected) + T5, MMDiT with patch 2, 16-channel VAE, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = _clip_tokenizer(scratch / "tokenizer")
    tokenizer_2 = _clip_tokenizer(scratch / "tokenizer_2", pad_token="!")
    tokenizer_3 = _t5_tokenizer(scratch / "tokenizer_3", model_max_length=512)  # T5's context
    clip_l_width, clip_g_width = size.text_width, size.wide_text_width
    # The pipeline zero-pads CLIP-L ++ CLIP-G features up to T5's width, so T5 must be at least as wide.
    t5_width = 2 * (clip_l_width + clip_g_width)
    _seed(seed, "text_encoder")
    text_encoder = _clip_text_encoder(tokenizer, clip_l_width, size.text_layers, big=False, with_projection=True)
    _seed(seed, "text_encoder_2")
    text_encoder_2 = _clip_text_encoder(tokenizer_2, clip_g_width, size.text_layers, big=True, with_projection=True)
    _seed(seed, "text_encoder_3")
    text_encoder_3 = _t5_encoder(tokenizer_3, t5_width, size.text_layers)
    _seed(seed, "transformer")
    transformer = SD3Transformer2DModel(
        sample_size=size.sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=size.dit_layers,
        attention_head_dim=CHANNELS_PER_HEAD,
        num_attention_heads=size.dit_width // CHANNELS_PER_HEAD,
        joint_attention_dim=t5_width,
        caption_projection_dim=size.dit_width,
        pooled_projection_dim=clip_l_width + clip_g_width,  # CLIP-L pooled ++ CLIP-G pooled
        pos_embed_max_size=64,  # patches per side: room for 1024 px images
    )
    _seed(seed, "vae")
    # SD3's VAE: 16 latent channels, its published shift and scale, no quant convs.
    vae = _vae(
        size,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # stabilityai/stable-diffusion-3-medium-diffusers scheduler: 1000 steps, timestep shift 3.0.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _chatglm_encoder(tokenizer, size: TwinSize):
    """Builds Kolors' ChatGLM3-style text encoder with explicit, seeded weights."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    heads = size.text_width // CHANNELS_PER_HEAD
    config = ChatGLMConfig(
        num_layers=size.text_layers,
        # SentencePiece pieces + ChatGLM's nine special tokens, rounded up to 64 like the real 65024.
        padded_vocab_size=math.ceil(tokenizer.vocab_size / 64) * 64,
        hidden_size=size.text_width,
        ffn_hidden_size=size.text_width * 2,
        kv_channels=CHANNELS_PER_HEAD,
        num_attention_heads=heads,
        seq_length=256,  # Kolors never feeds more than 256 tokens; the rotary cache is built this long
        add_qkv_bias=True,  # ChatGLM3 has query/key/value biases and no other linear biases
        multi_query_attention=True,  # ChatGLM3 shares key/value heads between query heads
        multi_query_group_num=max(heads // 2, 1),
        original_rope=True,  # the attribute ChatGLMModel reads; Kolors' config sets it
    )
    # empty_init=True (the default) leaves weights as uninitialised memory, which gives NaN images.
    model = ChatGLMModel(config, empty_init=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name:
                parameter.fill_(1.0)  # RMSNorm gains are created with torch.empty
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(mean=0.0, std=0.02)  # GPT-style init
    return model


def _build_kolors(size: TwinSize, seed: int, scratch: Path):
    """Kolors: ChatGLM text encoder, SDXL-shaped UNet projecting ChatGLM states (text_proj), Euler."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    tokenizer = _chatglm_tokenizer(scratch / "tokenizer")
    _seed(seed, "text_encoder")
    text_encoder = _chatglm_encoder(tokenizer, size)
    _seed(seed, "unet")
    unet = _sdxl_unet(
        size,
        cross_attention_dim=size.wide_text_width,
        pooled_dim=size.text_width,  # the pooled embedding is ChatGLM's last hidden state at the last token
        encoder_hid_dim_type="text_proj",  # a linear layer maps ChatGLM states to cross_attention_dim
        encoder_hid_dim=size.text_width,
    )
    _seed(seed, "vae")
    vae = _vae(size, latent_channels=4, scaling_factor=0.13025, force_upcast=True)  # Kolors reuses the SDXL VAE
    # Kwai-Kolors/Kolors-diffusers scheduler: trained over 1100 steps with scaled_linear 0.00085-0.014,
    # "leading" spacing and offset 1, as in SDXL.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1100,
        beta_start=0.00085,
        beta_end=0.014,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def _build_hunyuan_dit(size: TwinSize, seed: int, scratch: Path):
    """Hunyuan-DiT: BERT + mT5 encoders, DiT with patch 2 and cross attention, DDPM with v-prediction."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    tokenizer = _bert_tokenizer(scratch / "tokenizer")
    tokenizer_2 = _t5_tokenizer(scratch / "tokenizer_2", model_max_length=1024)  # mT5's context
    _seed(seed, "text_encoder")
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.text_width,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_width // CHANNELS_PER_HEAD,
            intermediate_size=size.text_width * 4,
        )
    )
    _seed(seed, "text_encoder_2")
    text_encoder_2 = _t5_encoder(tokenizer_2, size.wide_text_width, size.text_layers)
    _seed(seed, "transformer")
    transformer = HunyuanDiT2DModel(
        num_attention_heads=size.dit_width // CHANNELS_PER_HEAD,
        attention_head_dim=CHANNELS_PER_HEAD,
        hidden_size=size.dit_width,
        in_channels=4,
        patch_size=2,
        sample_size=size.sample_size,
        num_layers=size.dit_layers,
        learn_sigma=True,  # the real model predicts a variance too; the pipeline drops it
        cross_attention_dim=size.text_width,  # BERT states
        cross_attention_dim_t5=size.wide_text_width,  # mT5 states, attention-pooled for the pooled projection
        pooled_projection_dim=size.text_width,
        text_len=77,  # the pipeline pads BERT tokens to 77
        text_len_t5=256,  # and mT5 tokens to 256
        use_style_cond_and_image_meta_size=True,  # v1.0/v1.1 layout, the diffusers default
    )
    _seed(seed, "vae")
    # Hunyuan-DiT uses the SDXL VAE in its fp16-fix variant, which needs no float32 upcast.
    vae = _vae(size, latent_channels=4, scaling_factor=0.13025, force_upcast=False)
    # Tencent-Hunyuan/HunyuanDiT-Diffusers scheduler: DDPM over 1000 steps, scaled_linear 0.00085-0.03,
    # v-prediction, "leading" spacing with offset 1.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.03,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return HunyuanDiTPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


# --- public API -------------------------------------------------------------------------------


def build_twin(family: str, out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Builds a twin pipeline with seeded random weights and saves it as a diffusers folder.

    The same family, preset and seed give bit-identical weights and identical tokenizers.

    Args:
        family: One of FAMILIES.
        out_dir: Folder to save into; created if missing.
        preset: One of PRESETS ("tiny" for tests, "small" for benchmarks).
        seed: Seed for the random weights.

    Returns:
        ``out_dir`` as a Path.
    """
    _check_choice(family, preset)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = FAMILIES[family].build_twin(SIZES[preset], seed, Path(scratch))
        pipeline.save_pretrained(out_dir)
    return out_dir


def ensure_twin(family: str, out_dir: str | Path, preset: str = "tiny") -> Path:
    """Returns ``out_dir`` holding the twin, building it first if it is not there.

    The twin is built in a temporary sibling folder and renamed into place, so readers never see a
    half-written folder; when two processes race, the loser discards its copy.

    Args:
        family: One of FAMILIES.
        out_dir: Folder the twin lives in.
        preset: One of PRESETS.

    Returns:
        ``out_dir`` as a Path.
    """
    _check_choice(family, preset)
    return build_in_place(out_dir, "model_index.json", lambda scratch: build_twin(family, scratch, preset))


def build_in_place(out_dir: str | Path, marker: str, build) -> Path:
    """out_dir, after build(folder) has filled it, unless out_dir/marker already exists.

    build writes into a temporary sibling folder that is then renamed into place, so readers never see a
    half-written folder; when two processes race, the loser discards its (identical) copy.
    """
    out_dir = Path(out_dir)
    if (out_dir / marker).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(scratch)
        scratch.chmod(0o755)  # mkdtemp makes the folder private; a shared cache should not be
        try:
            os.rename(scratch, out_dir)
        except OSError as error:
            # Renaming onto a non-empty folder fails: another process finished first.
            if not (out_dir / marker).exists():
                raise FileExistsError(f"{out_dir} exists but holds no {marker}; delete it and retry") from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # nothing left to remove after a successful rename
    return out_dir
