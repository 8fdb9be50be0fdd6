"""Wan text-to-video RL pipeline (Wan2.1 T2V; Wan2.2: TI2V-5B's text-to-video, the two-expert T2V-A14B): the
diffusers ``WanPipeline`` plus the RL hooks of ``pipelines/base.py``.

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

Wan2.2-T2V-A14B (``transformer_2`` and ``boundary_ratio`` in model_index.json): two experts, chosen per row by its
timestep as ``WanPipeline.__call__`` chooses per step: ``transformer`` (high noise) where the timestep is >=
``boundary_ratio * num_train_timesteps``, ``transformer_2`` (low noise) below, with CFG scale ``guidance_scale_2``
(``actor_rollout_ref.model.wan.guidance_scale_2``; the rollout's scale when null). The choice reads the timestep, so
the actor's recomputation of a step runs the expert its rollout ran; rows on both sides of the boundary (a
DiffusionNFT batch's random timesteps) split into one forward per expert. It costs one host sync per forward.

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
from verl_omni.pipelines.common import expand_timestep, to_uint8_video
from verl_omni.pipelines.engine_attention import AttentionFn, install_processor, serves_dtype
from verl_omni.pipelines.model_inputs import TextInputs
from verl_omni.pipelines.wan.attention import WanEngineAttnProcessor
from verl_omni.pipelines.wan.options import DEFAULT_FPS, DEFAULT_NUM_FRAMES, WanOptions, check_num_frames

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s max_sequence_length (UMT5 tokens)


class WanRLPipeline(RLPipelineMixin, WanPipeline):
    """``WanPipeline`` (same components, loadable with ``from_pretrained``) with ``rl_generate`` and
    ``predict_velocity`` (``RLPipelineMixin``): Wan2.1, Wan2.2-TI2V-5B's per-token timesteps, Wan2.2-T2V-A14B's two
    experts (the module doc)."""

    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH
    # flow_grpo's Wan2.1 trainer (scripts/train_wan2_1.py, zhtmike/flow_grpo 9745241): gradients flow through both CFG
    # branches (compute_log_prob detaches neither), and rows whose advantage is 0 are dropped before the update.
    REFERENCE_TRAINER_DEFAULTS = {"flowgrpo": {"detach_unconditional": False, "drop_zero_advantage": True}}
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float = DEFAULT_FPS
    guidance_scale_2: Optional[float] = None
    _row_guidance: Optional[torch.Tensor] = None  # per-row CFG scales during one predict_velocity (two experts)

    def apply_family_options(self, options: Optional[WanOptions]) -> None:
        """``actor_rollout_ref.model.wan`` (None: the defaults): the clip length, checked against this VAE, and the
        low-noise expert's CFG scale, for a two-expert pipeline only."""
        options = options or WanOptions()
        if (self.transformer_2 is None) != (self.config.boundary_ratio is None):
            raise ValueError(
                "actor_rollout_ref.model.path holds a WanPipeline with only one of transformer_2 / boundary_ratio: a "
                "two-expert Wan2.2 pipeline (T2V-A14B) declares both in model_index.json"
            )
        if options.guidance_scale_2 is not None and self.transformer_2 is None:
            raise ValueError(
                f"{options.key('guidance_scale_2')}={options.guidance_scale_2} is the low-noise expert's CFG scale: "
                "this pipeline has one transformer (no transformer_2); leave it null"
            )
        check_num_frames(options.key("num_frames"), options.num_frames, self.vae_scale_factor_temporal)
        self.num_frames, self.fps = options.num_frames, options.fps
        self.guidance_scale_2 = options.guidance_scale_2

    # ------------------------------------------------------------------------------------------ experts
    @property
    def denoisers(self) -> dict[str, torch.nn.Module]:
        """``transformer`` and, with two experts, ``transformer_2`` (high, low noise): the adapter wraps both."""
        if self.transformer_2 is None:
            return {"transformer": self.transformer}
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    @property
    def experts(self) -> list[torch.nn.Module]:
        """The denoising transformers in routing order: high noise first."""
        return list(self.denoisers.values())

    @property
    def boundary_timestep(self) -> Optional[float]:
        """The timestep below which ``transformer_2`` denoises (None: one transformer), as ``WanPipeline``."""
        ratio = self.config.boundary_ratio
        return None if ratio is None else ratio * self.scheduler.config.num_train_timesteps

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
        return sum(install_processor(e, kinds, lambda: WanEngineAttnProcessor(attention_fn)) for e in self.experts)

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
        """One forward on video latents [R, C, F', h, w] (the positions come from the latents' own shape), by the
        expert of each row's timestep (two experts: one forward per expert that has rows)."""
        boundary = self.boundary_timestep
        if boundary is None:
            return self._denoise(self.transformer, latents, timestep, text.embeds)
        low = timestep < boundary
        low_rows = int(low.sum())  # the one host sync: which expert runs
        if low_rows in (0, len(low)):
            expert = self.transformer_2 if low_rows else self.transformer
            return self._denoise(expert, latents, timestep, text.embeds)
        groups = [torch.nonzero(~low).flatten(), torch.nonzero(low).flatten()]
        experts = zip(self.experts, groups, strict=True)
        parts = [self._denoise(e, latents[r], timestep[r], text.embeds[r]) for e, r in experts]
        return torch.cat(parts)[torch.cat(groups).argsort()]

    def _denoise(
        self, expert: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        """``expert``'s forward; with ``expand_timesteps`` (Wan2.2-TI2V-5B) the timestep of each row goes to every one
        of its tokens."""
        if self.config.expand_timesteps:
            timestep = self.token_timesteps(latents, timestep)
        return expert(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def predict_velocity(self, latents, timestep, cond, guidance_scale, height, width, **kwargs) -> torch.Tensor:
        """``RLPipelineMixin.predict_velocity``; with two experts and ``guidance_scale_2``, the rows of the low-noise
        expert's timesteps are guided by ``guidance_scale_2`` (``guidance_scale`` still says whether ``cond`` is
        guided)."""
        self._row_guidance = self._low_noise_guidance(latents, timestep, guidance_scale)
        try:
            return super().predict_velocity(latents, timestep, cond, guidance_scale, height, width, **kwargs)
        finally:
            self._row_guidance = None

    def _low_noise_guidance(self, latents, timestep, guidance_scale: float) -> Optional[torch.Tensor]:
        """Per-row CFG scales [B, 1, 1, 1, 1] (``guidance_scale_2`` where the row's timestep is the low-noise
        expert's), or None where every row takes ``guidance_scale``."""
        boundary = self.boundary_timestep
        if boundary is None or self.guidance_scale_2 is None or self.guidance_scale_2 == guidance_scale:
            return None
        rows = expand_timestep(timestep, latents.shape[0], latents.device)
        scales = torch.where(rows < boundary, self.guidance_scale_2, float(guidance_scale))
        return scales.view(-1, *([1] * (latents.ndim - 1)))

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
        """True CFG as ``WanPipeline``: ``u + w (c - u)`` (``w`` per row during a two-expert ``predict_velocity``
        with ``guidance_scale_2``)."""
        scale = guidance_scale if self._row_guidance is None else self._row_guidance.to(conditional.dtype)
        return unconditional + scale * (conditional - unconditional)

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
