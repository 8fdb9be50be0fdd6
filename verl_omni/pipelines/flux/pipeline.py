"""FLUX.1-dev RL pipeline: the diffusers ``FluxPipeline`` plus the RL hooks of ``pipelines/base.py``.

FLUX.1-dev is guidance-distilled: the guidance strength is an INPUT of the transformer (its guidance embedding),
not a second branch. Every forward, rollout and training alike, passes ``distilled_guidance_scale`` (3.5, the
default of ``FluxPipeline.__call__``'s ``guidance_scale`` and flow_grpo's FLUX configs; configured as
``actor_rollout_ref.model.flux.distilled_guidance_scale``, set on every loaded pipeline by
``apply_family_options``). It is a property of the pipeline, not of a request, so the actor's recomputation always
sees what the rollout saw.

True classifier-free guidance is optional, as ``FluxPipeline``'s ``true_cfg_scale``: the sampling params'
``guidance_scale`` (the config's ``actor_rollout_ref.rollout.pipeline.true_cfg_scale``) above 1 adds the negative
branch (the given ``negative_prompt``, or the empty prompt) and combines ``u + w (c - u)``. Both branches carry the
distilled guidance. The default, 1.0, is one branch: what flow_grpo trains FLUX with.

Text: CLIP-L's pooled embedding conditions the timestep embedding; T5-XXL's embeddings, padded to
``max_sequence_length``, are the text stream (so a prompt and its negative always have the same length: no mask).
Latents: 2x2 patches of the 16-channel VAE latents packed into 64 channels ([B, S, 64]); the positions go in as
``img_ids`` / ``txt_ids``. Schedule: ``np.linspace(1, 1/T, T)`` shifted dynamically, ``mu`` from the packed image
sequence length, exactly as ``FluxPipeline.__call__`` (diffusers 0.38). ``RLBatchOutput.timesteps`` holds what the
transformer receives, ``t / 1000``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.base import EncodedPrompt, RLPipelineMixin
from verl_omni.pipelines.common import decode_scaled_latents
from verl_omni.pipelines.engine_attention import AttentionFn, install_processor, serves_dtype
from verl_omni.pipelines.flux.attention import FluxEngineAttnProcessor
from verl_omni.pipelines.flux.options import DISTILLED_GUIDANCE_SCALE, FluxOptions
from verl_omni.pipelines.model_inputs import TextInputs

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.check_inputs limit (T5 tokens)


class FluxRLPipeline(RLPipelineMixin, FluxPipeline):
    """``FluxPipeline`` (same components, loadable with ``from_pretrained``) with ``rl_generate`` and
    ``predict_velocity`` (``RLPipelineMixin``)."""

    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH
    REQUIRES_POOLED = True  # CLIP's pooled embedding conditions the timestep embedding
    MODEL_TIMESTEP_DIVISOR = 1000  # the transformer receives t / 1000, as the stock pipeline passes it
    # flow_grpo's FLUX trainer (yifan123/flow_grpo scripts/train_flux.py): no CFG branch (true CFG is off), and every
    # row trains, zero advantage or not. With true CFG on, gradients flow through both branches.
    REFERENCE_TRAINER_DEFAULTS = {"flowgrpo": {"detach_unconditional": False, "drop_zero_advantage": False}}
    # cuDNN's SDPA backward (torch 2.11, cuDNN 9 on an H100) fails with an illegal memory access on FLUX.1-dev's
    # training shapes (24 heads x 128, 4096 image + 128 text tokens at 512^2); flash serves the update instead
    # (core/workarounds.py, update_sdpa_backends).
    TRAINING_CUDNN_ATTENTION = False
    # The guidance embedding's input in every forward (the module doc says why it is not per request).
    distilled_guidance_scale: float = DISTILLED_GUIDANCE_SCALE

    def apply_family_options(self, options: Optional[FluxOptions]) -> None:
        """``actor_rollout_ref.model.flux``: the distilled guidance every forward passes (None: the default)."""
        options = options or FluxOptions()
        self.distilled_guidance_scale = options.distilled_guidance_scale

    # ------------------------------------------------------------------------------------------ engine attention
    @property
    def has_unmasked_attention_kernel(self) -> bool:
        """An engine's kernel is installed (``use_attention_function``) and takes this transformer's dtype."""
        return getattr(self, "_attention_fn", None) is not None and serves_dtype(self.transformer.dtype)

    def use_attention_function(self, attention_fn: AttentionFn) -> int:
        """Route every attention module (double- and single-stream blocks) through :class:`FluxEngineAttnProcessor`
        with ``attention_fn`` (an engine's fused kernel). Returns the number of modules changed."""
        self._attention_fn = attention_fn
        kinds = (FluxAttnProcessor, FluxEngineAttnProcessor)
        return install_processor(self.transformer, kinds, lambda: FluxEngineAttnProcessor(attention_fn))

    # ------------------------------------------------------------------------------------------ prompts
    def count_truncated_tokens(self, prompt: str, max_sequence_length: int) -> int:
        """Tokens of ``prompt`` that T5 (whose length ``max_sequence_length`` governs) cuts off. Logged at DEBUG
        only; the caller reports the count."""
        length = len(self.tokenizer_2(prompt).input_ids)
        if length > max_sequence_length:
            logger.debug("prompt of %d tokens truncated to %d: %.80r", length, max_sequence_length, prompt)
        return max(0, length - max_sequence_length)

    def _encode(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=self._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled

    def encode_conditions(
        self, prompt: str, negative_prompt: Optional[str], params: DiffusionSamplingParams
    ) -> EncodedPrompt:
        embeds, pooled = self._encode(prompt, params.max_sequence_length)
        cond = Conditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if negative_prompt is not None:
            cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds = self._encode(
                negative_prompt, params.max_sequence_length
            )
        return EncodedPrompt(cond, self.count_truncated_tokens(prompt, params.max_sequence_length))

    # ------------------------------------------------------------------------------------------ model call
    def transformer_velocity(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: TextInputs, height: int, width: int
    ) -> torch.Tensor:
        """One forward on packed ``latents`` [R, S, C]: the guidance embedding gets ``distilled_guidance_scale``
        (when the transformer has one), text tokens position 0, image tokens their (row, column) on the packed grid."""
        rows, device = latents.shape[0], latents.device
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((rows,), float(self.distilled_guidance_scale), device=device, dtype=torch.float32)
        grid_h, grid_w = self._packed_grid(height, width)
        img_ids = self._prepare_latent_image_ids(1, grid_h, grid_w, device, text.embeds.dtype)
        txt_ids = torch.zeros(text.length, 3, device=device, dtype=text.embeds.dtype)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=text.pooled,
            encoder_hidden_states=text.embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    def combine_guidance(
        self, conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """True CFG as ``FluxPipeline`` with ``true_cfg_scale``: ``u + w (c - u)``."""
        return unconditional + guidance_scale * (conditional - unconditional)

    # ------------------------------------------------------------------------------------------ schedule, latents
    def rl_base_sigmas(self, steps: int) -> Optional[np.ndarray]:
        # FluxPipeline passes linspace(1, 1/T, T) unless the scheduler computes its own (use_flow_sigmas).
        if self.scheduler.config.get("use_flow_sigmas"):
            return None
        return np.linspace(1.0, 1 / steps, steps)

    def _packed_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of packed 2x2 latent patches, as ``FluxPipeline.prepare_latents`` lays them out."""
        return height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2)

    def rl_image_seq_len(self, params: DiffusionSamplingParams) -> int:
        grid_h, grid_w = self._packed_grid(params.height, params.width)
        return grid_h * grid_w

    def prepare_rl_latents(
        self,
        batch_size: int,
        params: DiffusionSamplingParams,
        generators: Sequence[torch.Generator],
        device: torch.device,
    ) -> torch.Tensor:
        """Packed x_T [B, S, C] as ``FluxPipeline.prepare_latents`` draws it from per-sample generators."""
        channels = self.transformer.config.in_channels // 4  # 2x2 patches packed into the channels
        latents, _ = self.prepare_latents(
            batch_size, channels, params.height, params.width, torch.float32, device, list(generators)
        )
        return latents

    def decode_rl_latents(self, latents: torch.Tensor, params: DiffusionSamplingParams) -> torch.Tensor:
        """Packed latents -> uint8 [B, H, W, 3], as the stock pipeline's decode (scaling / shift factors undone)."""
        latents = self._unpack_latents(latents, params.height, params.width, self.vae_scale_factor)
        return decode_scaled_latents(self.vae, latents)


__all__ = ["DISTILLED_GUIDANCE_SCALE", "FluxRLPipeline"]
