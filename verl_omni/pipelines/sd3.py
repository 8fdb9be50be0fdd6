"""Stable Diffusion 3 / 3.5 RL pipeline: the diffusers ``StableDiffusion3Pipeline`` plus a FlowGRPO rollout.

``rl_generate`` and the trainer's log-prob recomputation both go through :meth:`SD3RLPipeline.predict_velocity`
(classic CFG: one batched forward over [negative; positive], ``uncond + w * (cond - uncond)``).

Timesteps: ``RLBatchOutput.timesteps`` holds what this transformer receives, ``sigma * 1000``; ``sigmas`` are the
scheduler's (static shift 3 for SD3.5), computed as ``StableDiffusion3Pipeline.__call__`` does.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from diffusers import StableDiffusion3Pipeline

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.common import (
    denoise_with_logprobs,
    expand_timestep,
    make_generators,
    negative_prompt_for,
    repeat_rows,
    start_request,
    to_batch_output,
    to_uint8_images,
)
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.schedulers.flow_match_sde import flow_match_sigmas

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # StableDiffusion3Pipeline.check_inputs limit (T5 tokens)


class SD3RLPipeline(StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (same components, loadable with ``from_pretrained``) with ``rl_generate`` and
    ``predict_velocity``."""

    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH

    # ------------------------------------------------------------------------------------------ model call
    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: dict,
        guidance_scale: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """Velocity [B, C, h, w] (float32) for ``latents`` [B, C, h, w] at ``timestep`` (scalar or [B], in
        [0, 1000] as stored in ``RLBatchOutput.timesteps``). Gradients flow (no ``no_grad`` here).

        ``cond``: ``prompt_embeds`` [B, L, D], ``pooled_prompt_embeds`` [B, P]; with ``guidance_scale > 1`` also
        ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``. ``height`` / ``width`` are unused
        (the latents are spatial) and kept for a pipeline-independent signature.
        """
        if isinstance(cond, Conditioning):  # transitional: the typed object as the old dict
            cond = {k: v for k, v in cond.as_fields().items() if v is not None}
        batch_size = latents.shape[0]
        device = latents.device
        dtype = self.transformer.dtype
        timestep = expand_timestep(timestep, batch_size, device)
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        hidden_states = latents
        do_cfg = guidance_scale > 1
        if do_cfg:
            if cond.get("negative_prompt_embeds") is None or cond.get("negative_pooled_prompt_embeds") is None:
                raise ValueError("guidance_scale > 1 needs cond['negative_prompt_embeds'] and ['negative_pooled_prompt_embeds']")
            # [negative; positive] in one forward, the order StableDiffusion3Pipeline uses.
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], pooled])
            hidden_states = torch.cat([latents, latents])
            timestep = torch.cat([timestep, timestep])
        prediction = self.transformer(
            hidden_states=hidden_states.to(dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.to(device=device, dtype=dtype),
            pooled_projections=pooled.to(device=device, dtype=dtype),
            return_dict=False,
        )[0]
        if do_cfg:
            uncond, text = prediction.chunk(2)
            prediction = uncond + guidance_scale * (text - uncond)
        return prediction.float()

    # ------------------------------------------------------------------------------------------ schedule
    def rl_sigmas(self, num_inference_steps: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [T+1], transformer timesteps [T] in [0, 1000]), exactly as ``StableDiffusion3Pipeline.__call__``."""
        patch = self.transformer.config.patch_size
        image_seq_len = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        return flow_match_sigmas(dict(self.scheduler.config), num_inference_steps, image_seq_len)

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rl_generate(self, prompt: str, seeds: list[int], params: DiffusionSamplingParams,
                    interrupt: Optional[Callable[[], bool]] = None) -> RLBatchOutput:
        """``len(seeds)`` images of ``prompt``; sample i's noise comes only from ``seeds[i]``."""
        seeds = start_request(prompt, seeds, params, self.vae_scale_factor, MAX_SEQUENCE_LENGTH)
        batch_size = len(seeds)
        device = self._execution_device
        height, width = params.height, params.width
        sigmas, model_timesteps = self.rl_sigmas(params.num_inference_steps, height, width)  # may still reject

        negative_prompt = negative_prompt_for(params, logger, "sd3_empty_negative")
        do_cfg = negative_prompt is not None
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
            max_sequence_length=params.max_sequence_length,
        )
        cond = {"prompt_embeds": repeat_rows(embeds, batch_size), "pooled_prompt_embeds": repeat_rows(pooled, batch_size)}
        if do_cfg:
            cond["negative_prompt_embeds"] = repeat_rows(neg_embeds, batch_size)
            cond["negative_pooled_prompt_embeds"] = repeat_rows(neg_pooled, batch_size)

        generators = make_generators(seeds)
        latents = self.prepare_latents(
            batch_size, self.transformer.config.in_channels, height, width, torch.float32, device, generators
        )
        result = denoise_with_logprobs(
            lambda x, t: self.predict_velocity(x, t, cond, params.guidance_scale, height, width),
            latents, sigmas, model_timesteps, params, generators, interrupt,
        )
        images = self.decode_latents(result.final_latents)
        return to_batch_output(images, result, sigmas, model_timesteps, cond, seeds)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 [B, H, W, 3], as the stock pipeline's decode (scaling / shift factors undone)."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        decoded = self.vae.decode(latents, return_dict=False)[0]
        return to_uint8_images(decoded)


__all__ = ["SD3RLPipeline"]
