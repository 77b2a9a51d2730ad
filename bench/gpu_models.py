"""Real-size architectures with random weights for the GPU benches, and the same pipelines from the tiny twins.

    from gpu_models import build_pipeline, prompt_embeddings
    pipe = build_pipeline("sd3", torch.device("cuda"), torch.float16)            # SD3 medium's shapes, random weights
    pipe = build_pipeline("sd3", torch.device("cpu"), torch.float32, smoke=True)  # the tiny_sd3 twin, same class

No weights are downloaded: each denoiser and VAE is built from the fields of its published config.json that differ
from diffusers' defaults (random weights), and the text encoders are left out: the prompt is given as random
embeddings of the real shapes (prompt_embeddings), as after the first image of a run. A twin pipeline (--smoke) is
rebuilt without its text encoders too, so both run the same code. Used by gpu_highres.py, gpu_train.py and
gpu_suite.py.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json and vae/config.json (the fields that differ from defaults)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, layers_per_block=2,
)
# force_upcast=False: the VAE runs in fp16 without diffusers' fp32 upcast, as with an fp16-fixed SDXL VAE
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, sample_size=1024, force_upcast=False,
)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler: scaled_linear 0.00085-0.012, "leading" spacing, offset 1
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      timestep_spacing="leading", steps_offset=1)

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json, vae/config.json, scheduler (shift 3)
SD3_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
    force_upcast=False,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# Kwai-Kolors/Kolors-diffusers unet/config.json (the VAE is SDXL's); scheduler: 1100 steps, 0.00085-0.014
KOLORS_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=5632,
)
KOLORS_SCHEDULER = dict(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
                        timestep_spacing="leading", steps_offset=1)

# Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers transformer/config.json (the VAE is SDXL's shape, scaling 0.13025);
# scheduler: DDPM, scaled_linear 0.00085-0.03, v-prediction
HUNYUAN_TRANSFORMER = dict(
    num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2, activation_fn="gelu-approximate",
    sample_size=128, hidden_size=1408, num_layers=40, mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024,
    norm_type="layer_norm", cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
    use_style_cond_and_image_meta_size=False,
)
HUNYUAN_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear",
                         prediction_type="v_prediction", clip_sample=False, timestep_spacing="leading", steps_offset=1)

# black-forest-labs/FLUX.1-dev transformer/config.json, vae/config.json and scheduler/scheduler_config.json
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)

# family -> (denoiser class, its config, VAE config, scheduler class, its config). SDXL-Turbo is SDXL's architecture
# (conf/model/sdxl_turbo.yaml changes only the defaults: its Euler-ancestral scheduler is synth's default_scheduler).
REAL_SIZE = {
    "sdxl": ("UNet2DConditionModel", SDXL_UNET, SDXL_VAE, "EulerDiscreteScheduler", SDXL_SCHEDULER),
    "sd3": ("SD3Transformer2DModel", SD3_TRANSFORMER, SD3_VAE, "FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER),
    "kolors": ("UNet2DConditionModel", KOLORS_UNET, SDXL_VAE, "EulerDiscreteScheduler", KOLORS_SCHEDULER),
    "hunyuan_dit": ("HunyuanDiT2DModel", HUNYUAN_TRANSFORMER, SDXL_VAE, "DDPMScheduler", HUNYUAN_SCHEDULER),
    "flux": ("FluxTransformer2DModel", FLUX_TRANSFORMER, FLUX_VAE, "FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER),
}


def without_encoders(cls, components: dict):
    """cls built from components, with every text encoder and tokenizer (and optional extra) left out."""
    names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    kept = {name: components.get(name) for name in names if name in ("vae", "unet", "transformer", "scheduler")}
    kept.update({name: None for name in names if name.startswith(("text_encoder", "tokenizer"))})
    kept.update({name: None for name in ("image_encoder", "feature_extractor", "safety_checker") if name in names})
    if "requires_safety_checker" in names:
        kept["requires_safety_checker"] = False
    return cls(**kept)


def twin_pipeline(model: str):
    """The text-to-image pipeline of synth's twin config `model` (e.g. tiny_sdxl), built on first use, loaded with
    from_pretrained as real weights are, then without its text encoders."""
    from hydra import compose, initialize_config_dir

    from synth import pipelines
    from synth.families import get_family

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("infer", [f"model={model}"])
    pipelines.ensure_weights(cfg.model)
    cls = get_family(cfg.model.family).pipeline_class("text2img")
    return without_encoders(cls, cls.from_pretrained(str(cfg.model.path), use_safetensors=True).components)


def build_denoiser(family: str, device, dtype):
    """The family's real-size denoiser with random weights (seed 0), built on `device` in `dtype` (FLUX's 12B
    parameters would be 48 GB in fp32 host memory)."""
    import diffusers

    name, config, *_ = REAL_SIZE[family]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return getattr(diffusers, name)(**config)
    finally:
        torch.set_default_dtype(default)


def build_pipeline(family: str, device, dtype, smoke: bool = False, twin: str | None = None):
    """The family's text-to-image pipeline at real size with random weights (smoke: synth's twin config `twin`,
    tiny_<family> by default), on device in dtype, without text encoders; progress bars off (they would be timed)."""
    import diffusers

    from synth.families import get_family

    if smoke:
        pipe = twin_pipeline(twin or f"tiny_{family}")
    else:
        _, _, vae_config, scheduler_name, scheduler_config = REAL_SIZE[family]
        denoiser = build_denoiser(family, device, dtype)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                vae = diffusers.AutoencoderKL(**vae_config)
        finally:
            torch.set_default_dtype(default)
        scheduler = getattr(diffusers, scheduler_name)(**scheduler_config)
        fam = get_family(family)
        pipe = without_encoders(fam.pipeline_class("text2img"), {fam.denoiser: denoiser, "vae": vae, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def prompt_embeddings(family: str, pipe, device, dtype, seed: int = 1) -> dict:
    """Random prompt (and negative prompt) embeddings of the shapes the family's text encoders give, read from the
    denoiser's config (so the twins get theirs): the pipeline-call arguments that replace `prompt`."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def ones(*shape):
        return torch.ones(*shape, dtype=torch.long, device=device)

    if family == "hunyuan_dit":  # bilingual CLIP (77 tokens) and mT5 (256 tokens), each with its mask
        config = pipe.transformer.config
        call = {}
        for prefix in ("", "negative_"):
            call.update({f"{prefix}prompt_embeds": randn(1, config.text_len, config.cross_attention_dim),
                         f"{prefix}prompt_attention_mask": ones(1, config.text_len),
                         f"{prefix}prompt_embeds_2": randn(1, config.text_len_t5, config.cross_attention_dim_t5),
                         f"{prefix}prompt_attention_mask_2": ones(1, config.text_len_t5)})
        return call
    if family == "flux":  # T5 states (512 tokens for [dev]) and CLIP-L's pooled output; no negative prompt
        config = pipe.transformer.config
        return {"prompt_embeds": randn(1, 512, config.joint_attention_dim),
                "pooled_prompt_embeds": randn(1, config.pooled_projection_dim)}
    if family == "sd3":  # CLIP-L + CLIP-G (77 tokens) then T5 (256 tokens); the CLIPs' pooled outputs
        config = pipe.transformer.config
        states, pooled = (1, 77 + 256, config.joint_attention_dim), (1, config.pooled_projection_dim)
    else:  # SDXL's CLIP-L + OpenCLIP-G (77 tokens), Kolors' ChatGLM (256 tokens), with the pooled text_embeds
        config = pipe.unet.config
        pooled = (1, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim)
        states = (1, 256, config.encoder_hid_dim) if config.encoder_hid_dim else (1, 77, config.cross_attention_dim)
    return {"prompt_embeds": randn(*states), "negative_prompt_embeds": randn(*states),
            "pooled_prompt_embeds": randn(*pooled), "negative_pooled_prompt_embeds": randn(*pooled)}
