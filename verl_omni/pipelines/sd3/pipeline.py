"""Stable Diffusion 3 / 3.5 RL pipeline: the diffusers ``StableDiffusion3Pipeline`` plus the RL hooks of
``pipelines/base.py``.

``rl_generate`` and the trainer's log-prob recomputation both go through ``predict_velocity`` (classic CFG,
``uncond + w * (cond - uncond)``; by default one forward over [negative; positive] as the stock pipeline runs it).
SD3's transformer takes no text mask: its prompt and negative prompt embeddings always have the same length
(CLIP padded to 77 tokens + T5 padded to ``max_sequence_length``), so they stack without padding.

Timesteps: ``RLBatchOutput.timesteps`` holds what this transformer receives, ``sigma * 1000``; ``sigmas`` are the
scheduler's (static shift 3 for SD3.5), computed as ``StableDiffusion3Pipeline.__call__`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.base import EncodedPrompt, RLPipelineMixin
from verl_omni.pipelines.common import decode_scaled_latents
from verl_omni.pipelines.engine_attention import AttentionFn, install_processor, serves_dtype
from verl_omni.pipelines.model_inputs import TextInputs
from verl_omni.pipelines.sd3.attention import SD3EngineAttnProcessor

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # StableDiffusion3Pipeline.check_inputs limit (T5 tokens)


class SD3RLPipeline(RLPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (same components, loadable with ``from_pretrained``) with ``rl_generate`` and
    ``predict_velocity`` (``RLPipelineMixin``)."""

    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH
    REQUIRES_POOLED = True  # pooled CLIP embeddings condition the timestep embedding
    # flow_grpo's SD3 trainer (yifan123/flow_grpo scripts/train_sd3.py at ac4c86e): the unconditional CFG branch is
    # detached in compute_log_prob, and rows whose advantage is 0 are dropped before the update. (Upstream later
    # dropped the detach, a482878 "fix cfg gradient detach"; set algorithm.flowgrpo.detach_unconditional=false.)
    REFERENCE_TRAINER_DEFAULTS = {"flowgrpo": {"detach_unconditional": True, "drop_zero_advantage": True}}
    # diffusers' SD3Transformer2DModel names no _repeated_blocks: its MMDiT blocks, for regional compile
    REPEATED_BLOCKS = ("JointTransformerBlock",)

    # ------------------------------------------------------------------------------------------ engine attention
    @property
    def has_unmasked_attention_kernel(self) -> bool:
        """An engine's kernel is installed (``use_attention_function``) and takes this transformer's dtype."""
        return getattr(self, "_attention_fn", None) is not None and serves_dtype(self.transformer.dtype)

    def use_attention_function(self, attention_fn: AttentionFn) -> int:
        """Route every attention module (the joint attention and SD3.5's image-only ``attn2``) through
        :class:`SD3EngineAttnProcessor` with ``attention_fn`` (an engine's fused kernel). Returns the number
        changed."""
        self._attention_fn = attention_fn
        kinds = (JointAttnProcessor2_0, SD3EngineAttnProcessor)
        return install_processor(self.transformer, kinds, lambda: SD3EngineAttnProcessor(attention_fn))

    # ------------------------------------------------------------------------------------------ prompts
    def count_truncated_tokens(self, prompt: str, max_sequence_length: int) -> int:
        """Tokens of ``prompt`` cut off by the encoder ``max_sequence_length`` governs: T5 (CLIP's fixed 77-token
        window when the pipeline has no T5). Logged at DEBUG only; the caller reports the count."""
        if self.text_encoder_3 is not None and self.tokenizer_3 is not None:
            tokenizer, limit = self.tokenizer_3, max_sequence_length
        else:
            tokenizer, limit = self.tokenizer, self.tokenizer_max_length
        length = len(tokenizer(prompt).input_ids)
        if length > limit:
            logger.debug("prompt of %d tokens truncated to %d: %.80r", length, limit, prompt)
        return max(0, length - limit)

    def encode_conditions(
        self, prompt: str, negative_prompt: Optional[str], params: DiffusionSamplingParams
    ) -> EncodedPrompt:
        guided = negative_prompt is not None
        embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
            max_sequence_length=params.max_sequence_length,
        )
        cond = Conditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if guided:
            cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds = negative_embeds, negative_pooled
        return EncodedPrompt(cond, self.count_truncated_tokens(prompt, params.max_sequence_length))

    # ------------------------------------------------------------------------------------------ model call
    def transformer_velocity(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: TextInputs, height: int, width: int
    ) -> torch.Tensor:
        """One forward on ``latents`` [R, C, h, w] (spatial: ``height`` / ``width`` are not needed)."""
        return self.transformer(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text.embeds,
            pooled_projections=text.pooled,
            return_dict=False,
        )[0]

    def combine_guidance(
        self, conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """Classic CFG, as ``StableDiffusion3Pipeline``: ``u + w (c - u)``."""
        return unconditional + guidance_scale * (conditional - unconditional)

    # ------------------------------------------------------------------------------------------ schedule, latents
    def rl_image_seq_len(self, params: DiffusionSamplingParams) -> int:
        tokens_per_side = self.vae_scale_factor * self.transformer.config.patch_size  # pixels per image token
        return (params.height // tokens_per_side) * (params.width // tokens_per_side)

    def prepare_rl_latents(
        self,
        batch_size: int,
        params: DiffusionSamplingParams,
        generators: Sequence[torch.Generator],
        device: torch.device,
    ) -> torch.Tensor:
        """x_T [B, C, h, w] as ``StableDiffusion3Pipeline.prepare_latents`` draws it from per-sample generators."""
        return self.prepare_latents(
            batch_size,
            self.transformer.config.in_channels,
            params.height,
            params.width,
            torch.float32,
            device,
            list(generators),
        )

    def decode_rl_latents(self, latents: torch.Tensor, params: DiffusionSamplingParams) -> torch.Tensor:
        """Latents -> uint8 [B, H, W, 3], as the stock pipeline's decode (scaling / shift factors undone)."""
        return decode_scaled_latents(self.vae, latents)


__all__ = ["SD3RLPipeline"]
