"""Wan text-to-video RL pipeline (Wan2.1 T2V, Wan2.2 TI2V-5B's text-to-video): the diffusers ``WanPipeline`` plus the
RL hooks of ``pipelines/base.py``.

Latents are video latents ``[B, C, F', h, w]`` (F' = (num_frames - 1) / 4 + 1 latent frames, h, w = H / s, W / s with
the VAE's spatial factor s: 8 for Wan2.1's VAE, 16 for Wan2.2's):
the SDE step, its log-prob (a mean over every latent element) and the trajectory are the other families', with a
frame axis. The clip length is ``actor_rollout_ref.model.wan.num_frames``, a property of the pipeline (set by
``apply_family_options`` on every loaded pipeline), so every rollout and the actor's recomputation agree on it.

Text: UMT5's embeddings of the prompt, cut to its length and zero-padded to ``max_sequence_length``, as
``WanPipeline.encode_prompt`` does: the transformer takes no text mask, and a prompt and its negative always have the
same length, so CFG's two branches share one forward.

CFG: true classifier-free guidance as ``WanPipeline`` (``u + w (c - u)``, default scale 5.0 there), the negative
branch from ``negative_prompt`` (the empty prompt when none is given).

Schedule: the pipeline's own scheduler. ``FlowMatchEulerDiscreteScheduler`` (the tiny model) goes through
``flow_match_sigmas``; the published checkpoints' ``UniPCMultistepScheduler`` over flow sigmas is asked for its
sigmas and timesteps directly (``set_timesteps`` on a fresh copy); its multistep UniPC update is not used: the ODE
steps are Euler steps and the window's are the flow-matching SDE's, as flow_grpo's Wan trainer does.
``RLBatchOutput.timesteps`` holds what the transformer receives (``sigma * 1000``; UniPC's are whole numbers).

Wan2.2-TI2V-5B (``expand_timesteps`` in model_index.json): the transformer takes one timestep per video token
(``[R, F' * h/2 * w/2]``, every token at the step's timestep in text-to-video), as ``WanPipeline.__call__`` passes it.
The two-expert Wan2.2-T2V-A14B (``transformer_2`` / ``boundary_ratio``) is refused by ``apply_family_options``.

Decode: the latents de-normalised with the VAE's ``latents_mean`` / ``latents_std``, the 3D VAE's output as uint8
frames ``[B, F, H, W, 3]`` (``core/media.py``'s convention).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.base import EncodedPrompt, RLPipelineMixin
from verl_omni.pipelines.common import to_uint8_video
from verl_omni.pipelines.engine_attention import AttentionFn, install_processor, serves_dtype
from verl_omni.pipelines.model_inputs import TextInputs
from verl_omni.pipelines.wan.attention import WanEngineAttnProcessor
from verl_omni.pipelines.wan.options import DEFAULT_FPS, DEFAULT_NUM_FRAMES, WanOptions, check_num_frames

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s max_sequence_length (UMT5 tokens)


class WanRLPipeline(RLPipelineMixin, WanPipeline):
    """``WanPipeline`` (same components, loadable with ``from_pretrained``) with ``rl_generate`` and
    ``predict_velocity`` (``RLPipelineMixin``). One transformer: Wan2.1, or Wan2.2-TI2V-5B's per-token timesteps
    (no Wan2.2 ``transformer_2`` expert)."""

    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH
    # flow_grpo's Wan2.1 trainer (scripts/train_wan2_1.py, zhtmike/flow_grpo 9745241): gradients flow through both CFG
    # branches (compute_log_prob detaches neither), and rows whose advantage is 0 are dropped before the update.
    REFERENCE_TRAINER_DEFAULTS = {"flowgrpo": {"detach_unconditional": False, "drop_zero_advantage": True}}
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float = DEFAULT_FPS

    def apply_family_options(self, options: Optional[WanOptions]) -> None:
        """``actor_rollout_ref.model.wan`` (None: the defaults): the clip length, checked against this VAE."""
        options = options or WanOptions()
        if self.transformer_2 is not None or self.config.boundary_ratio is not None:
            raise ValueError(
                "actor_rollout_ref.model.path holds a two-expert Wan2.2 pipeline (transformer_2 / boundary_ratio, "
                "Wan2.2-T2V-A14B); the wan family serves one transformer: Wan2.1 T2V or Wan2.2-TI2V-5B"
            )
        check_num_frames(options.key("num_frames"), options.num_frames, self.vae_scale_factor_temporal)
        self.num_frames, self.fps = options.num_frames, options.fps

    # ------------------------------------------------------------------------------------------ engine attention
    @property
    def has_unmasked_attention_kernel(self) -> bool:
        """An engine's kernel is installed (``use_attention_function``) and takes this transformer's dtype."""
        return getattr(self, "_attention_fn", None) is not None and serves_dtype(self.transformer.dtype)

    def use_attention_function(self, attention_fn: AttentionFn) -> int:
        """Route every attention module (self-attention and the cross-attention to the text) through
        :class:`WanEngineAttnProcessor` with ``attention_fn`` (an engine's fused kernel). Returns the number
        changed."""
        self._attention_fn = attention_fn
        kinds = (WanAttnProcessor, WanEngineAttnProcessor)
        return install_processor(self.transformer, kinds, lambda: WanEngineAttnProcessor(attention_fn))

    # ------------------------------------------------------------------------------------------ prompts
    def count_truncated_tokens(self, prompt: str, max_sequence_length: int) -> int:
        """UMT5 tokens of ``prompt`` (cleaned as ``WanPipeline`` cleans it) cut off at ``max_sequence_length``.
        Logged at DEBUG only; the caller reports the count."""
        length = len(self.tokenizer(prompt_clean(prompt)).input_ids)
        if length > max_sequence_length:
            logger.debug("prompt of %d tokens truncated to %d: %.80r", length, max_sequence_length, prompt)
        return max(0, length - max_sequence_length)

    def encode_conditions(
        self, prompt: str, negative_prompt: Optional[str], params: DiffusionSamplingParams
    ) -> EncodedPrompt:
        guided = negative_prompt is not None
        embeds, negative_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=guided,
            num_videos_per_prompt=1,
            max_sequence_length=params.max_sequence_length,
            device=self._execution_device,
        )
        cond = Conditioning(prompt_embeds=embeds)
        if guided:
            cond.negative_prompt_embeds = negative_embeds
        return EncodedPrompt(cond, self.count_truncated_tokens(prompt, params.max_sequence_length))

    # ------------------------------------------------------------------------------------------ model call
    def transformer_velocity(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: TextInputs, height: int, width: int
    ) -> torch.Tensor:
        """One forward on video latents [R, C, F', h, w] (the positions come from the latents' own shape); with
        ``expand_timesteps`` (Wan2.2-TI2V-5B) the timestep of each row goes to every one of its tokens."""
        if self.config.expand_timesteps:
            timestep = self.token_timesteps(latents, timestep)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text.embeds,
            return_dict=False,
        )[0]

    def token_timesteps(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """[R] -> [R, tokens]: each row's timestep for each of its video tokens (F' * h * w over the patch), as
        ``WanPipeline.__call__`` builds it with ``expand_timesteps``."""
        patch_t, patch_h, patch_w = self.transformer.config.patch_size
        frames, height, width = latents.shape[-3:]
        tokens = (frames // patch_t) * (height // patch_h) * (width // patch_w)
        return timestep[:, None].expand(-1, tokens)

    def combine_guidance(
        self, conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """True CFG as ``WanPipeline``: ``u + w (c - u)``."""
        return unconditional + guidance_scale * (conditional - unconditional)

    # ------------------------------------------------------------------------------------------ schedule, latents
    def rl_schedule(self, params: DiffusionSamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [T+1], transformer timesteps [T] in [0, 1000]), as ``WanPipeline.__call__``'s scheduler sets
        them (the module doc)."""
        steps = params.num_inference_steps
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            return super().rl_schedule(params)
        if not getattr(self.scheduler.config, "use_flow_sigmas", False):
            raise ValueError(
                f"{type(self.scheduler).__name__} without use_flow_sigmas has no flow-matching schedule: the wan "
                "family needs FlowMatchEulerDiscreteScheduler or UniPCMultistepScheduler(use_flow_sigmas=True) "
                "(the published Wan2.1 scheduler) in the model directory's scheduler/"
            )
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device="cpu")
        return scheduler.sigmas.float().cpu(), scheduler.timesteps.float().cpu()

    def rl_tail_schedule(
        self, params: DiffusionSamplingParams, start_index: int, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A coarser schedule from step ``start_index`` to sigma 0, shifted the same way (``flow_match_tail_sigmas``);
        with a ``FlowMatchEulerDiscreteScheduler`` only."""
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise NotImplementedError(
                f"ode_solver={params.ode_solver!r} needs a FlowMatchEulerDiscreteScheduler; this Wan pipeline has "
                f"{type(self.scheduler).__name__}: use ode_solver=euler"
            )
        return super().rl_tail_schedule(params, start_index, num_points)

    def rl_image_seq_len(self, params: DiffusionSamplingParams) -> int:
        """Video tokens per sample (only a dynamically shifted scheduler would read it; Wan2.1's shift is static)."""
        _, patch_h, patch_w = self.transformer.config.patch_size
        frames = (self.num_frames - 1) // self.vae_scale_factor_temporal + 1
        side = self.vae_scale_factor_spatial
        return frames * (params.height // (side * patch_h)) * (params.width // (side * patch_w))

    def prepare_rl_latents(
        self,
        batch_size: int,
        params: DiffusionSamplingParams,
        generators: Sequence[torch.Generator],
        device: torch.device,
    ) -> torch.Tensor:
        """x_T [B, C, F', h, w] as ``WanPipeline.prepare_latents`` draws it from per-sample generators."""
        return self.prepare_latents(
            batch_size,
            self.transformer.config.in_channels,
            params.height,
            params.width,
            self.num_frames,
            torch.float32,
            device,
            list(generators),
        )

    def decode_rl_latents(self, latents: torch.Tensor, params: DiffusionSamplingParams) -> torch.Tensor:
        """Latents -> uint8 frames [B, F, H, W, 3], as ``WanPipeline``'s decode (the latents de-normalised first)."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        latents = latents / inverse_std.to(latents.device, latents.dtype) + mean
        return to_uint8_video(self.vae.decode(latents, return_dict=False)[0])


__all__ = ["WanRLPipeline"]
