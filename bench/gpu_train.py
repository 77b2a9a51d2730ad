"""LoRA training at 1024x1024 on real-size SD3 medium, Kolors, Hunyuan-DiT and FLUX.1 [dev] architectures with
random weights.

    python bench/gpu_train.py [--families sd3,kolors,hunyuan_dit,flux] [--steps 10] [--rank 16] [--no-checkpointing]

Needs CUDA. Builds each denoiser from its published config (random weights: no download), adds synth's LoRA
(synth.train.lora.add_lora), enables gradient checkpointing, and runs synth's own objective (synth.train.objectives)
in bf16 autocast with AdamW on the LoRA weights, on random 1024x1024 latents and random text embeddings of the
real shapes. Prints it/s and the CUDA allocator's peak for the training step, plus that peak with the frozen
text encoders and VAE added at their bf16 size, beside the published figures (SD3 without T5 about 10 GB,
Kolors about 22 GB with an fp16-safe VAE, Hunyuan-DiT 12-24 GB; FLUX's 11.9B-parameter transformer alone is 24 GB
in bf16).
"""

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf

GIB = 2**30
# Frozen parts that stay resident during training, in parameters (bf16: 2 bytes each).
ENCODER_PARAMS = {
    "sd3": 123e6 + 695e6 + 84e6,  # CLIP-L + CLIP-G + VAE; T5-XXL (4.7B) dropped, as in the 10 GB figure
    "kolors": 6.2e9 + 84e6,  # ChatGLM3-6B + VAE
    "hunyuan_dit": 350e6 + 1.7e9 + 84e6,  # bilingual CLIP + mT5-XL encoder + VAE
    "flux": 123e6 + 4.7e9 + 84e6,  # CLIP-L + T5-XXL + VAE
}
PUBLISHED = {"sd3": "about 10 GB (no T5)", "kolors": "about 22 GB", "hunyuan_dit": "12-24 GB",
             "flux": "none (weights alone 24 GB)"}
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def build(family: str):
    """(denoiser, objective, cond, batch) for one family at its real size."""
    from diffusers import (
        DDPMScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        HunyuanDiT2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    from synth.families import get_family

    objective_cfg = OmegaConf.create(
        {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
         "loss_weighting": "none", "shift": 3.0, "prediction_type": None, "noise_offset": 0.0, "snr_gamma": None,
         "guidance_scale": 3.5, "max_sequence_length": 512}
    )
    size = {"original_size": torch.tensor([[1024, 1024]]), "crop_top_left": torch.tensor([[0, 0]]),
            "target_size": torch.tensor([[1024, 1024]])}
    batch = {key: value.cuda() for key, value in size.items()}
    if family == "sd3":  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
        denoiser = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        )
        pipe = SimpleNamespace(scheduler=SimpleNamespace(config={"shift": 3.0}))
        cond = {"encoder_hidden_states": torch.randn(1, 77 + 256, 4096), "pooled_projections": torch.randn(1, 2048)}
        channels = 16
    elif family == "kolors":  # Kwai-Kolors/Kolors-diffusers unet/config.json
        denoiser = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
            encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=5632,
        )
        pipe = SimpleNamespace(scheduler=DDPMScheduler(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014,
                                                       beta_schedule="scaled_linear"))
        cond = {"encoder_hidden_states": torch.randn(1, 256, 4096), "text_embeds": torch.randn(1, 4096)}
        channels = 4
    elif family == "flux":
        # 11.9B parameters: initialised on the GPU in bf16, not in host memory or fp32 (48 GB)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                denoiser = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        finally:
            torch.set_default_dtype(default)
        # the objective packs latents and makes position ids with FluxPipeline's own static helpers
        pipe = SimpleNamespace(scheduler=SimpleNamespace(config={"shift": 3.0}), vae_scale_factor=8,
                               _pack_latents=FluxPipeline._pack_latents, _unpack_latents=FluxPipeline._unpack_latents,
                               _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids)
        cond = {"encoder_hidden_states": torch.randn(1, 512, 4096), "pooled_projections": torch.randn(1, 768),
                "txt_ids": torch.zeros(512, 3)}
        channels = 16
    else:  # Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers transformer/config.json
        denoiser = HunyuanDiT2DModel(
            num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
            activation_fn="gelu-approximate", sample_size=128, hidden_size=1408, num_layers=40, mlp_ratio=4.3637,
            learn_sigma=True, cross_attention_dim=1024, norm_type="layer_norm", cross_attention_dim_t5=2048,
            pooled_projection_dim=1024, text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False,
        )
        pipe = SimpleNamespace(scheduler=DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03,
                                                       beta_schedule="scaled_linear", prediction_type="v_prediction"))
        cond = {"encoder_hidden_states": torch.randn(1, 77, 1024), "text_embedding_mask": torch.ones(1, 77),
                "encoder_hidden_states_t5": torch.randn(1, 256, 2048), "text_embedding_mask_t5": torch.ones(1, 256)}
        channels = 4
    objective = get_family(family).objective_class()(pipe, objective_cfg)
    cond = {key: value.cuda() for key, value in cond.items()}
    latents = torch.randn(1, channels, 128, 128, device="cuda")
    return denoiser, objective, cond, batch, latents


def bench(family: str, steps: int, rank: int, checkpointing: bool) -> tuple[float, int]:
    from synth.families import get_family
    from synth.train.lora import add_lora

    denoiser, objective, cond, batch, latents = build(family)
    denoiser.to("cuda", torch.bfloat16)
    lora_cfg = OmegaConf.create({"rank": rank, "alpha": rank, "dropout": 0.0, "init": True, "target_modules": None})
    params = add_lora(denoiser, lora_cfg, get_family(family))
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        generator = torch.Generator().manual_seed(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.loss(denoiser, latents, cond, batch, generator).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter())
    peak = torch.cuda.max_memory_allocated()
    del denoiser, optimizer, params
    torch.cuda.empty_cache()
    return (len(times) - 3) / (times[-1] - times[2]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd3,kolors,hunyuan_dit,flux")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_train.py needs CUDA")
    print(f"{torch.cuda.get_device_name()}; LoRA rank {args.rank}; 1024x1024; bf16 autocast; "
          f"gradient checkpointing {'off' if args.no_checkpointing else 'on'}")
    print(f"{'family':<12} {'it/s':>6} {'step peak GiB':>14} {'+ encoders GiB':>15}  published")
    for family in args.families.split(","):
        its, peak = bench(family, args.steps, args.rank, not args.no_checkpointing)
        total = peak + ENCODER_PARAMS[family] * 2
        print(f"{family:<12} {its:>6.2f} {peak / GIB:>14.1f} {total / GIB:>15.1f}  {PUBLISHED[family]}")


if __name__ == "__main__":
    main()
