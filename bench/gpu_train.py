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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from omegaconf import OmegaConf

GIB = 2**30
# Frozen parts that stay resident during training, in parameters (bf16: 2 bytes each).
ENCODER_PARAMS = {
    "sd3": 123e6 + 695e6 + 84e6,  # CLIP-L + CLIP-G + VAE; T5-XXL (4.7B) dropped, as in the 10 GB figure
    "kolors": 6.2e9 + 84e6,  # ChatGLM3-6B + VAE
    "hunyuan_dit": 350e6 + 1.7e9 + 84e6,  # bilingual CLIP + mT5-XL encoder + VAE
    "flux": 123e6 + 4.7e9 + 84e6,  # CLIP-L + T5-XXL + VAE
    "sdxl": 123e6 + 695e6 + 84e6,  # CLIP-L + OpenCLIP-G + VAE
}
PUBLISHED = {"sd3": "about 10 GB (no T5)", "kolors": "about 22 GB", "hunyuan_dit": "12-24 GB",
             "flux": "none (weights alone 24 GB)", "sdxl": "none recorded"}


def objective_pipe(family: str, smoke: bool):
    """What synth's objective reads from the pipeline (the scheduler config; FLUX's packing helpers): the twin
    pipeline itself in --smoke, else a stand-in holding the real model's scheduler."""
    import diffusers
    from diffusers import FluxPipeline

    from gpu_models import REAL_SIZE, twin_pipeline

    if smoke:
        return twin_pipeline(f"tiny_{family}")
    _, _, _, scheduler_name, scheduler_config = REAL_SIZE[family]
    pipe = SimpleNamespace(scheduler=getattr(diffusers, scheduler_name)(**scheduler_config), vae_scale_factor=8)
    if family == "flux":  # the objective packs latents and makes position ids with FluxPipeline's own static helpers
        pipe.__dict__.update(_pack_latents=FluxPipeline._pack_latents, _unpack_latents=FluxPipeline._unpack_latents,
                             _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids)
    return pipe


def random_cond(family: str, denoiser) -> dict:
    """Random text conditioning of the shapes the family's (cached) text embeddings have, from the denoiser's config."""
    config = denoiser.config
    if family == "sd3":
        return {"encoder_hidden_states": torch.randn(1, 77 + 256, config.joint_attention_dim),
                "pooled_projections": torch.randn(1, config.pooled_projection_dim)}
    if family == "flux":
        return {"encoder_hidden_states": torch.randn(1, 512, config.joint_attention_dim),
                "pooled_projections": torch.randn(1, config.pooled_projection_dim), "txt_ids": torch.zeros(512, 3)}
    if family == "hunyuan_dit":
        return {"encoder_hidden_states": torch.randn(1, config.text_len, config.cross_attention_dim),
                "text_embedding_mask": torch.ones(1, config.text_len),
                "encoder_hidden_states_t5": torch.randn(1, config.text_len_t5, config.cross_attention_dim_t5),
                "text_embedding_mask_t5": torch.ones(1, config.text_len_t5)}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    if config.encoder_hid_dim:  # Kolors: ChatGLM's 256 states, projected by the UNet
        return {"encoder_hidden_states": torch.randn(1, 256, config.encoder_hid_dim), "text_embeds": torch.randn(1, pooled)}
    return {"encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim), "text_embeds": torch.randn(1, pooled)}


def build(family: str, device="cuda", smoke: bool = False, size: int = 1024):
    """(denoiser, objective, cond, batch, latents) for one family at its real size (smoke: its tiny twin), the
    cached-encoding case: random latents and text embeddings of the real shapes, no VAE or text encoder."""
    from gpu_models import build_denoiser
    from synth.families import get_family

    torch.manual_seed(0)
    objective_cfg = OmegaConf.create(
        {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
         "loss_weighting": "none", "shift": 3.0, "prediction_type": None, "noise_offset": 0.0, "snr_gamma": None,
         "guidance_scale": 3.5, "max_sequence_length": 512}
    )
    sizes = {"original_size": torch.tensor([[size, size]]), "crop_top_left": torch.tensor([[0, 0]]),
             "target_size": torch.tensor([[size, size]])}
    batch = {key: value.to(device) for key, value in sizes.items()}
    fam = get_family(family)
    pipe = objective_pipe(family, smoke)
    # 11.9B parameters for FLUX: built on the GPU in bf16, not in host memory or fp32 (48 GB)
    denoiser = getattr(pipe, fam.denoiser) if smoke else build_denoiser(family, device, torch.bfloat16)
    channels = 16 if family in ("sd3", "flux") else 4
    cond = {key: value.to(device) for key, value in random_cond(family, denoiser).items()}
    objective = fam.objective_class()(pipe, objective_cfg)
    latents = torch.randn(1, channels, size // 8, size // 8, device=device)
    return denoiser, objective, cond, batch, latents


def step_times(family: str, steps: int, rank: int, checkpointing: bool, device="cuda", smoke: bool = False,
               size: int = 1024, warmup: int = 2) -> tuple[list[float], int]:
    """Seconds of each of `steps` LoRA training steps after `warmup` ones through synth's add_lora and objective
    (bf16 autocast on CUDA, AdamW), and the CUDA allocator's peak over all of them (bytes; 0 on CPU)."""
    from synth.families import get_family
    from synth.train.lora import add_lora

    device = torch.device(device)
    denoiser, objective, cond, batch, latents = build(family, device, smoke, size)
    denoiser.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    lora_cfg = OmegaConf.create({"rank": rank, "alpha": rank, "dropout": 0.0, "init": True, "target_modules": None})
    params = add_lora(denoiser, lora_cfg, get_family(family))
    if checkpointing and denoiser._supports_gradient_checkpointing:  # HunyuanDiT2DModel has none in diffusers 0.42
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(index: int) -> None:
        generator = torch.Generator().manual_seed(index)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = objective.loss(denoiser, latents, cond, batch, generator).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, device, steps, warmup)


def timed_steps(step, device, steps: int, warmup: int) -> tuple[list[float], int]:
    """Run step(i) warmup + steps times (CUDA synchronised); the timed steps' seconds and the peak over all (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step(index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return seconds, peak


def diffusers_loss(family: str, denoiser, scheduler, latents, cond: dict, batch: dict, generator):
    """One step's loss written as diffusers' LoRA training examples write it: train_text_to_image_lora_sdxl.py
    (SDXL; Kolors' UNet takes the same call), train_dreambooth_lora_sd3.py (SD3: logit-normal timesteps looked up
    in the scheduler's sigmas); Hunyuan-DiT has no diffusers example, so its call is HunyuanDiTPipeline's."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn(latents.shape, generator=generator).to(latents)
    steps = scheduler.config.num_train_timesteps
    if family == "sd3":
        u = compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                  generator=generator)
        indices = (u * steps).long()
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                              pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        return F.mse_loss(prediction.float(), (noise - latents).float())
    timesteps = torch.randint(0, steps, (1,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if family == "hunyuan_dit":
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

        grid = (noisy.shape[2] // denoiser.config.patch_size, noisy.shape[3] // denoiser.config.patch_size)
        rotary = get_2d_rotary_pos_embed(denoiser.inner_dim // denoiser.num_heads,
                                         get_resize_crop_region_for_grid(grid, 512 // 8 // denoiser.config.patch_size),
                                         grid, device=noisy.device, output_type="pt")
        meta = torch.cat([batch["original_size"], batch["target_size"], batch["crop_top_left"]], dim=1).to(noisy)
        output = denoiser(noisy, timesteps.to(noisy.dtype), encoder_hidden_states=cond["encoder_hidden_states"],
                          text_embedding_mask=cond["text_embedding_mask"],
                          encoder_hidden_states_t5=cond["encoder_hidden_states_t5"],
                          text_embedding_mask_t5=cond["text_embedding_mask_t5"], image_meta_size=meta,
                          style=torch.zeros(1, dtype=torch.long, device=noisy.device), image_rotary_emb=rotary,
                          return_dict=False)[0]
        prediction = output.chunk(2, dim=1)[0]
        return F.mse_loss(prediction.float(), scheduler.get_velocity(latents, noise, timesteps).float())
    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).to(noisy)
    prediction = denoiser(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                          added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": time_ids},
                          return_dict=False)[0]
    return F.mse_loss(prediction.float(), noise.float())


def diffusers_step_times(family: str, steps: int, rank: int, checkpointing: bool, device="cuda", smoke: bool = False,
                         size: int = 1024, warmup: int = 2) -> tuple[list[float], int]:
    """step_times' baseline: the same denoiser, LoRA shape and cached inputs, with the adapter added and the loss
    computed as diffusers' examples do (LoraConfig + add_adapter, cast_training_params, diffusers_loss)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    from synth.families import get_family

    device = torch.device(device)
    denoiser, objective, cond, batch, latents = build(family, device, smoke, size)
    denoiser.requires_grad_(False)
    denoiser.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=list(get_family(family).default_lora_targets))
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config)
    else:  # HunyuanDiT2DModel has no PEFT mixin
        inject_adapter_in_model(config, denoiser)
    cast_training_params(denoiser, dtype=torch.float32)
    if checkpointing and denoiser._supports_gradient_checkpointing:  # HunyuanDiT2DModel has none in diffusers 0.42
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-4)
    base = objective.pipe.scheduler.config
    scheduler = (FlowMatchEulerDiscreteScheduler if family == "sd3" else DDPMScheduler).from_config(base)

    def step(index: int) -> None:
        generator = torch.Generator().manual_seed(index)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = diffusers_loss(family, denoiser, scheduler, latents.to(torch.bfloat16 if device.type == "cuda"
                                                                          else torch.float32), cond, batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, device, steps, warmup)


def bench(family: str, steps: int, rank: int, checkpointing: bool) -> tuple[float, int]:
    """(it/s, peak bytes) of the real-size family on CUDA (this script's table)."""
    seconds, peak = step_times(family, steps, rank, checkpointing)
    torch.cuda.empty_cache()
    return len(seconds) / sum(seconds), peak


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
