"""Image-to-image for Hunyuan-DiT, which diffusers ships only as text-to-image.

`HunyuanDiTImg2ImgPipeline` subclasses `diffusers.HunyuanDiTPipeline` and keeps all of its
prompt encoding and input checks; it adds what the other diffusers img2img pipelines
(StableDiffusionXLImg2ImgPipeline, StableDiffusion3Img2ImgPipeline) add on top of text-to-image:
encode the input image with the VAE, noise it to the timestep that `strength` picks, and run
only the tail of the schedule from there.

Build it from any Hunyuan-DiT pipeline without loading weights twice:

    img2img = HunyuanDiTImg2ImgPipeline.from_pipe(text2img)      # or (**text2img.components)
    image = img2img("a cat", image=photo, strength=0.6).images[0]
"""

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import HunyuanDiTPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import (
    SUPPORTED_SHAPE,
    get_resize_crop_region_for_grid,
    map_to_standard_shapes,
    rescale_noise_cfg,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class HunyuanDiTImg2ImgPipeline(HunyuanDiTPipeline):
    """Hunyuan-DiT image-to-image: same components and prompt arguments as `HunyuanDiTPipeline`.

    Differences from the text-to-image parent, all deliberate:
    - The output size defaults to the input image's size, not the transformer's sample size, and a
      size that is not a multiple of `size_multiple` (16 for the released model) is refused with a
      ValueError rather than rounded down.
    - `use_resolution_binning` defaults to False, because binning silently changes the size.
    - The rotary grid is computed with the VAE's real downsampling factor where the parent assumes 8;
      for the released model (8x VAE) the two are identical.
    """

    @property
    def size_multiple(self) -> int:
        """Pixels per transformer patch; image sizes must be a multiple of it (8 x 2 = 16 for the real model)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def image_size(self, image) -> tuple[int, int]:
        """Return the (height, width) in pixels of an `image` argument, before any resizing.

        Follows VaeImageProcessor's layouts: PIL, numpy HWC / NHWC, torch CHW / NCHW, or a list of
        those; latents (see `is_latent_input`) count as the size they decode to.
        """
        if self.is_latent_input(image):
            return image.shape[2] * self.vae_scale_factor, image.shape[3] * self.vae_scale_factor
        first = image[0] if isinstance(image, list) else image
        if isinstance(first, PIL.Image.Image):
            return first.height, first.width
        if isinstance(first, np.ndarray) and first.ndim >= 3:
            return first.shape[-3], first.shape[-2]
        if isinstance(first, torch.Tensor) and first.ndim >= 3:
            return first.shape[-2], first.shape[-1]
        raise ValueError(
            "`image` must be a PIL image, an HWC/NHWC numpy array, a CHW/NCHW torch tensor or a list of them, "
            f"got {type(first).__name__}."
        )

    def is_latent_input(self, image) -> bool:
        """True when `image` is an NCHW batch of scaled VAE latents, as `output_type="latent"` returns them.

        The diffusers img2img pipelines take such latents in place of pixels (a highres pass does).
        """
        latent_channels = self.vae.config.latent_channels
        return isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == latent_channels

    def check_img2img_inputs(self, image, strength, num_inference_steps, height, width):
        """Refuse what the text-to-image `check_inputs` does not know about: image, strength, size."""
        if image is None:
            raise ValueError("`image` is required for image-to-image; HunyuanDiTPipeline does text-to-image.")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}.")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} runs "
                f"int({num_inference_steps} * {strength}) = 0 denoising steps; raise either of them."
            )
        multiple = self.size_multiple
        if height % multiple != 0 or width % multiple != 0:
            raise ValueError(
                f"Hunyuan-DiT needs height and width that are multiples of {multiple} (VAE factor "
                f"{self.vae_scale_factor} x patch size {self.transformer.config.patch_size}), got "
                f"{height}x{width} (height x width); resize or crop the image, or pass height= and width=."
            )

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """Keep the last int(num_inference_steps * strength) steps of the schedule already set.

        Adapted from diffusers' StableDiffusionXLImg2ImgPipeline.get_timesteps (the floor convention;
        StableDiffusion3Img2ImgPipeline rounds the other way).
        """
        start = num_inference_steps - int(num_inference_steps * strength)
        timesteps = self.scheduler.timesteps[start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            # Sigma-based schedulers (Euler, DPM++) index their sigmas from here in add_noise and step.
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return timesteps

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Encode a pixel batch in [-1, 1] to scaled latents, taking the mode of the VAE posterior.

        The diffusers img2img pipelines sample the posterior instead; for trained VAEs the two differ
        by a negligible amount, while the mode keeps encoding deterministic and keeps the
        random-weight test twins' wide posterior from drowning the image.
        """
        image = image.to(device=self._execution_device, dtype=self.vae.dtype)
        return self.vae.encode(image).latent_dist.mode() * self.vae.config.scaling_factor

    def prepare_img2img_latents(
        self, image, start_timestep, strength, batch_size, dtype, device, generator, latents=None
    ) -> torch.Tensor:
        """Return the starting latents: the encoded image noised to `start_timestep`; pure noise at strength 1.

        `image` is the preprocessed batch (pixels in [-1, 1], or latents); it is repeated to
        `batch_size` rows. `latents`, if given, is the Gaussian noise to use instead of drawing it
        from `generator`.
        """
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for a batch of {batch_size} images; pass one per image."
            )
        if batch_size % image.shape[0] != 0:
            raise ValueError(f"Cannot repeat {image.shape[0]} input images to a batch of {batch_size} images.")
        image = image.repeat_interleave(batch_size // image.shape[0], dim=0)

        shape = (batch_size, self.vae.config.latent_channels, *image.shape[-2:])
        if not self.is_latent_input(image):
            shape = (*shape[:2], shape[2] // self.vae_scale_factor, shape[3] // self.vae_scale_factor)
        # Noise first, so one generator gives the same noise at every strength and, at strength 1,
        # the same starting point as the text-to-image pipeline.
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape} for this image and batch, got {tuple(latents.shape)}")
        else:
            noise = latents.to(device=device, dtype=dtype)

        if strength == 1.0:
            # Like the diffusers inpaint pipelines' strength-1 case: the image is not used at all,
            # where add_noise at the first timestep would still leak a little of it.
            return noise * self.scheduler.init_noise_sigma

        init_latents = image if self.is_latent_input(image) else self.encode_image(image)
        init_latents = init_latents.to(device=device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, start_timestep.repeat(batch_size))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_2: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_2: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        prompt_attention_mask_2: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask_2: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] = (1024, 1024),
        target_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        use_resolution_binning: bool = False,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Re-draw `image` guided by `prompt`; arguments not listed are HunyuanDiTPipeline.__call__'s.

        Args:
            image: PIL image, numpy array or torch tensor in [0, 1] (or a list of them), or VAE
                latents as returned with `output_type="latent"`. One image, or one per prompt.
            strength: how much of the schedule to run, in (0, 1]: int(num_inference_steps * strength)
                steps run, starting from the image noised to that point. 1.0 starts from pure noise
                and ignores the image.
            height, width: output size; default the input image's size. Must be multiples of
                `size_multiple` (16); the image is resized to them.
            latents: Gaussian noise of the latent shape to use instead of drawing it from `generator`;
                it is mixed with the encoded image at the starting timestep.
            use_resolution_binning: map the size to the nearest size Hunyuan-DiT was trained on and
                resize the image to it. Off by default: it changes the output size.

        Returns:
            StableDiffusionPipelineOutput, or (images, nsfw_flags) when `return_dict` is False.

        Steps 5-7 (conditioning, denoising loop, decode) are copied from diffusers'
        HunyuanDiTPipeline.__call__ and adapted: the loop runs over the truncated img2img schedule,
        and the rotary grid uses `self.vae_scale_factor` where the original hard-codes 8.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Size: the input image's unless given; binning (opt-in) maps it to a trained size.
        if image is not None:
            image_height, image_width = self.image_size(image)
            height = height or image_height
            width = width or image_width
        if use_resolution_binning and (height, width) not in SUPPORTED_SHAPE:
            width, height = (int(side) for side in map_to_standard_shapes(width, height))

        # 1. Check inputs: ours first (image, strength, size), then the parent's prompt checks.
        self.check_img2img_inputs(image, strength, num_inference_steps, height, width)
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            prompt_embeds_2,
            negative_prompt_embeds_2,
            prompt_attention_mask_2,
            negative_prompt_attention_mask_2,
            callback_on_step_end_tensor_inputs,
        )
        if self.is_latent_input(image) and (height, width) != self.image_size(image):
            raise ValueError(
                f"Latents given as `image` decode to {self.image_size(image)} (height, width) and cannot be "
                f"resized to {(height, width)}; leave height and width unset."
            )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._interrupt = False

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 2. Encode the prompt with both text encoders (bilingual BERT, then mT5), as the parent does.
        (
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        ) = self.encode_prompt(
            prompt=prompt,
            device=device,
            dtype=self.transformer.dtype,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            max_sequence_length=77,
            text_encoder_index=0,
        )
        (
            prompt_embeds_2,
            negative_prompt_embeds_2,
            prompt_attention_mask_2,
            negative_prompt_attention_mask_2,
        ) = self.encode_prompt(
            prompt=prompt,
            device=device,
            dtype=self.transformer.dtype,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds_2,
            negative_prompt_embeds=negative_prompt_embeds_2,
            prompt_attention_mask=prompt_attention_mask_2,
            negative_prompt_attention_mask=negative_prompt_attention_mask_2,
            max_sequence_length=256,
            text_encoder_index=1,
        )

        # 3. Timesteps: the full schedule, then only its last int(steps * strength) steps.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.get_timesteps(num_inference_steps, strength)

        # 4. Starting latents: the image, encoded and noised to the first kept timestep.
        if not self.is_latent_input(image):
            image = self.image_processor.preprocess(image, height=height, width=width)
        total_batch_size = batch_size * num_images_per_prompt
        latents = self.prepare_img2img_latents(
            image, timesteps[:1], strength, total_batch_size, prompt_embeds.dtype, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Rotary position embedding for the latent patch grid, style and size conditioning.
        patch_size = self.transformer.config.patch_size
        grid_height = height // self.vae_scale_factor // patch_size
        grid_width = width // self.vae_scale_factor // patch_size
        base_size = 512 // self.vae_scale_factor // patch_size  # Hunyuan-DiT's rotary base: a 512 px image
        grid_crops_coords = get_resize_crop_region_for_grid((grid_height, grid_width), base_size)
        image_rotary_emb = get_2d_rotary_pos_embed(
            self.transformer.inner_dim // self.transformer.num_heads,
            grid_crops_coords,
            (grid_height, grid_width),
            device=device,
            output_type="pt",
        )
        style = torch.tensor([0], device=device)
        target_size = target_size or (height, width)
        add_time_ids = list(original_size + target_size + crops_coords_top_left)
        add_time_ids = torch.tensor([add_time_ids], dtype=prompt_embeds.dtype)

        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            prompt_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
            prompt_embeds_2 = torch.cat([negative_prompt_embeds_2, prompt_embeds_2])
            prompt_attention_mask_2 = torch.cat([negative_prompt_attention_mask_2, prompt_attention_mask_2])
            add_time_ids = torch.cat([add_time_ids] * 2, dim=0)
            style = torch.cat([style] * 2, dim=0)
        prompt_embeds = prompt_embeds.to(device=device)
        prompt_attention_mask = prompt_attention_mask.to(device=device)
        prompt_embeds_2 = prompt_embeds_2.to(device=device)
        prompt_attention_mask_2 = prompt_attention_mask_2.to(device=device)
        add_time_ids = add_time_ids.to(dtype=prompt_embeds.dtype, device=device).repeat(total_batch_size, 1)
        style = style.to(device=device).repeat(total_batch_size)

        # 6. Denoising loop.
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                t_expand = torch.tensor([t] * latent_model_input.shape[0], device=device).to(
                    dtype=latent_model_input.dtype
                )
                noise_pred = self.transformer(
                    latent_model_input,
                    t_expand,
                    encoder_hidden_states=prompt_embeds,
                    text_embedding_mask=prompt_attention_mask,
                    encoder_hidden_states_t5=prompt_embeds_2,
                    text_embedding_mask_t5=prompt_attention_mask_2,
                    image_meta_size=add_time_ids,
                    style=style,
                    image_rotary_emb=image_rotary_emb,
                    return_dict=False,
                )[0]
                # The transformer also predicts a learned variance, which the DDPM-style step does not use.
                noise_pred, _ = noise_pred.chunk(2, dim=1)

                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    step_locals = locals()
                    callback_kwargs = {name: step_locals[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    # Negative embeddings a callback returns are ignored, as in the parent: by now they
                    # are the first half of prompt_embeds / prompt_embeds_2.
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    prompt_embeds_2 = callback_outputs.pop("prompt_embeds_2", prompt_embeds_2)
                progress_bar.update()

        # 7. Decode (and run the safety checker, when the pipeline has one).
        if output_type == "latent":
            image, has_nsfw_concept = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
            if has_nsfw_concept is None:
                do_denormalize = [True] * image.shape[0]
            else:
                do_denormalize = [not nsfw for nsfw in has_nsfw_concept]
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        self.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw_concept
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
