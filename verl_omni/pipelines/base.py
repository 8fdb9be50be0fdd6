"""The RL pipeline, written once: :class:`RLPipelineMixin` gives a diffusers pipeline ``rl_generate`` (one prompt,
N seeds), ``rl_generate_rows`` (a prompt and a seed per row) and ``predict_velocity`` over a few per-model hooks.

A model is its diffusers pipeline class with this mixin in front (``class XRLPipeline(RLPipelineMixin,
XPipeline)``, in ``pipelines/<family>/pipeline.py``) and these hooks:

- ``rl_image_seq_len(params)``: the transformer's image token count (what dynamic shifting reads), and optionally
  ``rl_base_sigmas(steps)``: the unshifted sigmas the stock pipeline passes its scheduler (default None: the
  scheduler's own spacing). From these the mixin computes ``rl_schedule(params) -> (sigmas [T+1], model_timesteps
  [T])`` as the stock pipeline does, and ``rl_tail_schedule(params, start_index, num_points)``: a coarser schedule
  from step ``start_index`` to sigma 0 with the same shift (for ``ode_solver="dpmsolver++"``);
- ``encode_conditions(prompt, negative_prompt, params) -> EncodedPrompt``: a :class:`Conditioning` of batch 1
  (negative branch only when ``negative_prompt`` is not None) and how many prompt tokens were truncated;
- ``prepare_rl_latents(batch_size, params, generators, device) -> x_T`` (float32): row i from ``generators[i]``;
- ``transformer_velocity(latents, timestep, text, height, width)``: ONE transformer forward on prepared
  :class:`TextInputs` (rows = latents' rows), in the transformer's dtype;
- ``combine_guidance(conditional, unconditional, guidance_scale)``: the model's CFG formula;
- ``decode_rl_latents(latents, params) -> uint8 [B, H, W, 3]`` on the latents' device;

and the class attributes ``MAX_SEQUENCE_LENGTH`` (the text-token limit the server checks requests against),
``SUPPORTS_TEXT_MASK`` (the transformer takes a text mask, so CFG branches of different lengths can share a call),
``REQUIRES_POOLED`` (pooled text embeddings are an input), ``MODEL_TIMESTEP_DIVISOR`` (the transformer receives the
scheduler's timestep divided by it: 1000 for a transformer that takes t / 1000), ``REFERENCE_TRAINER_DEFAULTS`` (per
algorithm name, what that algorithm's reference trainer does for this family: an algorithm's null settings resolve
to these), ``REPEATED_BLOCKS`` (the transformer's block classes that regional compile compiles -- the engine's
and the actor's -- for a diffusers transformer class that names none in ``_repeated_blocks``) and
``TRAINING_CUDNN_ATTENTION`` (whether the actor's update may run SDPA on cuDNN: ``core/workarounds.py``
``update_sdpa_backends``).

``apply_family_options(options)`` takes the family's own options section (``actor_rollout_ref.model.<family>``,
None for a family without one); ``pipelines/loading.py`` calls it on every pipeline it loads (both engines' and the
actor's). The default ignores it: a family whose options change what the pipeline computes overrides it.

Optional: ``use_attention_function(attention_fn, **options)`` routes the transformer's attention through an
engine's fused kernel (the vllm-omni engine calls it when present), with ``has_unmasked_attention_kernel`` saying so;
its keyword options are the family's own speed switches (its options section's ``attention_options()``; a family
without an options section gets none).

Requests are validated once, by the server (``verl_omni.rollout.request.validate_request``); a pipeline trusts
its parameters. Only what the scheduler math itself rejects (e.g. one step with ``shift_terminal``) raises here,
and before any model runs, because the schedule is computed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from verl_omni.config.sampling import AUTO, BatchCfg, DiffusionSamplingParams
from verl_omni.core.conditioning import FIELDS as CONDITIONING_FIELDS
from verl_omni.core.conditioning import Conditioning
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.models.lora import ExpertModules
from verl_omni.pipelines.common import (
    decode_in_batches,
    denoise_with_logprobs,
    expand_timestep,
    make_generators,
    negative_prompt_for,
    to_batch_output,
)
from verl_omni.pipelines.model_inputs import ModelInputs, TextInputs, prepare_model_inputs
from verl_omni.schedulers.flow_match_sde import flow_match_sigmas, flow_match_tail_sigmas

logger = logging.getLogger(__name__)

NEGATIVE_FIELDS = tuple(f for f in CONDITIONING_FIELDS if f.startswith("negative_"))
DEFAULT_BATCH_CFG = True  # CFG's two branches as one call of 2B rows (see pipelines/model_inputs.py)


@dataclass(frozen=True)
class EncodedPrompt:
    """What ``encode_conditions`` returns: the conditioning of ONE sample, and the prompt tokens cut off at
    ``max_sequence_length`` (0 when the prompt fit)."""

    conditioning: Conditioning
    truncated_prompt_tokens: int = 0


class RLPipelineMixin:
    """``rl_generate`` and ``predict_velocity`` for a diffusers pipeline that implements the hooks above."""

    MAX_SEQUENCE_LENGTH: int
    SUPPORTS_TEXT_MASK: bool = False
    REQUIRES_POOLED: bool = False
    REFERENCE_TRAINER_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    REPEATED_BLOCKS: ClassVar[tuple[str, ...]] = ()
    TRAINING_CUDNN_ATTENTION: ClassVar[bool] = True
    MODEL_TIMESTEP_DIVISOR: ClassVar[float] = 1.0  # the transformer receives the scheduler's timestep / this

    def text_encoder_components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (every module component whose name starts with
        ``text_encoder``: Qwen-Image's one, SD3's three): what the hybrid engine's actor takes off the device during
        its update (``actor_rollout_ref.model.text_encoder_offload``). A family whose encoders are named otherwise
        overrides this."""
        components = getattr(self, "components", {}) or {}
        return {
            name: module
            for name, module in components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        }

    def apply_family_options(self, options: Any) -> None:
        """Take the family's options section (``actor_rollout_ref.model.<family>``; None: the family has none or
        the defaults). Nothing here: a family whose options change what its pipeline computes overrides this."""

    @property
    def has_unmasked_attention_kernel(self) -> bool:
        """Whether the transformer's attention runs a fused kernel that serves only unmasked calls (an engine's
        FA3): ``batch_cfg="auto"`` then prefers two unmasked calls to one masked one."""
        return False

    # ------------------------------------------------------------------------------------------ schedule
    def rl_schedule(self, params: DiffusionSamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [T+1], transformer timesteps [T]): ``flow_match_sigmas`` of the scheduler's config, as the stock
        pipeline computes them."""
        steps = params.num_inference_steps
        sigmas, timesteps = flow_match_sigmas(
            dict(self.scheduler.config),
            steps,
            self.rl_image_seq_len(params),
            base_sigmas=self.rl_base_sigmas(steps),
        )
        return sigmas, timesteps / self.MODEL_TIMESTEP_DIVISOR

    def rl_tail_schedule(
        self, params: DiffusionSamplingParams, start_index: int, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [num_points], transformer timesteps [num_points - 1]) of a coarser schedule from step
        ``start_index`` of :meth:`rl_schedule`'s to sigma 0, shifted the same way (``flow_match_tail_sigmas``)."""
        steps = params.num_inference_steps
        sigmas, timesteps = flow_match_tail_sigmas(
            dict(self.scheduler.config),
            steps,
            self.rl_image_seq_len(params),
            start_index,
            num_points,
            base_sigmas=self.rl_base_sigmas(steps),
        )
        return sigmas, timesteps / self.MODEL_TIMESTEP_DIVISOR

    # ------------------------------------------------------------------------------------------ hooks
    def rl_image_seq_len(self, params: DiffusionSamplingParams) -> int:
        raise NotImplementedError

    def rl_base_sigmas(self, steps: int) -> Optional[np.ndarray]:
        """The ``steps`` unshifted sigmas the stock pipeline passes its scheduler; None: the scheduler's own
        spacing."""
        return None

    def encode_conditions(
        self, prompt: str, negative_prompt: Optional[str], params: DiffusionSamplingParams
    ) -> EncodedPrompt:
        raise NotImplementedError

    def prepare_rl_latents(
        self,
        batch_size: int,
        params: DiffusionSamplingParams,
        generators: Sequence[torch.Generator],
        device: torch.device,
    ) -> torch.Tensor:
        raise NotImplementedError

    def transformer_velocity(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: TextInputs, height: int, width: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def combine_guidance(
        self, conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        raise NotImplementedError

    @property
    def denoisers(self) -> dict[str, torch.nn.Module]:
        """The denoising transformers by component name: ``{"transformer": ...}``; a pipeline with several experts
        (Wan2.2-T2V-A14B) names each. Loading freezes them and the adapter wraps each (:attr:`lora_module`)."""
        return {"transformer": self.transformer}

    @property
    def lora_module(self) -> torch.nn.Module:
        """The module the LoRA is added to, trained and exchanged through (actor and engines alike): the transformer,
        or every denoiser as one :class:`~verl_omni.models.lora.ExpertModules` (tensors named by expert)."""
        denoisers = self.denoisers
        if len(denoisers) == 1:
            return next(iter(denoisers.values()))
        cached = self.__dict__.get("_lora_module")
        if cached is None or dict(cached.named_children()) != denoisers:
            cached = ExpertModules(denoisers)
            self.__dict__["_lora_module"] = cached
        return cached

    @staticmethod
    def vae_decode(vae: torch.nn.Module, latents: torch.Tensor) -> Any:
        """The VAE call of this family's decode, on latents already scaled for it; the full fine-tuning memory plan
        runs it on fake tensors to count the rollout's decode (models/vae_memory.py)."""
        return vae.decode(latents, return_dict=False)[0]

    def decode_rl_latents(self, latents: torch.Tensor, params: DiffusionSamplingParams) -> torch.Tensor:
        """The final latents as uint8 media on the device: [B, H, W, 3] images or [B, F, H, W, 3] videos (the
        record gives images their frame axis)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ model call
    def prepare_model_inputs(
        self,
        cond: Conditioning,
        guidance_scale: float,
        batch_cfg: BatchCfg = DEFAULT_BATCH_CFG,
        device: Optional[torch.device | str] = None,
        unmasked_kernel: Optional[bool] = None,
    ) -> ModelInputs:
        """``cond`` (B rows) as :class:`ModelInputs` for :meth:`predict_velocity`: call it once per request or
        training micro-batch, then pass the result to every ``predict_velocity`` of those rows (it holds the
        embeddings in the transformer's dtype on ``device`` -- default: the transformer's -- the CFG branches
        stacked when ``batch_cfg``, and all-ones masks dropped; that check is its one host sync).
        ``unmasked_kernel``: whether unmasked calls have a fused kernel that masked ones lack (what ``"auto"``
        weighs); default: an engine's kernel is installed (the rollout). The actor says so for its training calls."""
        if device is None:
            device = next(self.transformer.parameters()).device
        if unmasked_kernel is None:
            unmasked_kernel = self.has_unmasked_attention_kernel
        return prepare_model_inputs(
            cond,
            guided=guidance_scale > 1,
            batch_cfg=batch_cfg,
            dtype=self.transformer.dtype,
            device=device,
            supports_text_mask=self.SUPPORTS_TEXT_MASK,
            requires_pooled=self.REQUIRES_POOLED,
            model_name=type(self).__name__,
            unmasked_kernel=unmasked_kernel,
        )

    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: Conditioning | ModelInputs,
        guidance_scale: float,
        height: int,
        width: int,
        *,
        batch_cfg: Optional[BatchCfg] = None,
        detach_unconditional: bool = False,
    ) -> torch.Tensor:
        """The (guided) velocity, float32, shaped like ``latents`` [B, ...], at ``timestep`` (scalar or [B], in the
        transformer's units as stored in ``RLBatchOutput.timesteps``). Gradients flow (no ``no_grad`` here).

        ``cond``: prepared :class:`ModelInputs` (no host sync here; their layout decides ``batch_cfg``), or a
        :class:`Conditioning`, prepared on the spot (one host sync per call). ``batch_cfg`` (default True): CFG's
        two branches as one forward of 2B rows instead of two forwards of B rows; same result within float
        rounding. ``height`` / ``width``: the image size (Qwen-Image's packed latents need it).
        ``detach_unconditional``: no gradient through CFG's unconditional branch (its value is unchanged; with two
        forwards that branch then runs without autograd).
        """
        inputs = self._model_inputs(cond, guidance_scale, batch_cfg, latents.device)
        batch_size = latents.shape[0]
        if inputs.batch_size != batch_size:
            raise ValueError(f"latents have {batch_size} rows, the conditioning {inputs.batch_size}")
        timestep = expand_timestep(timestep, batch_size, latents.device)
        hidden_states = latents.to(self.transformer.dtype)
        if inputs.joint is not None:
            both = self.transformer_velocity(
                torch.cat([hidden_states, hidden_states]), torch.cat([timestep, timestep]), inputs.joint, height, width
            )
            unconditional, conditional = both.chunk(2)  # the order stack_branches wrote
            if detach_unconditional:
                unconditional = unconditional.detach()
        else:
            conditional = self.transformer_velocity(hidden_states, timestep, inputs.conditional, height, width)
            if inputs.unconditional is None:
                return conditional.float()
            with torch.no_grad() if detach_unconditional else contextlib.nullcontext():
                unconditional = self.transformer_velocity(hidden_states, timestep, inputs.unconditional, height, width)
        return self.combine_guidance(conditional, unconditional, guidance_scale).float()

    def _model_inputs(
        self, cond: Conditioning | ModelInputs, guidance_scale: float, batch_cfg: Optional[bool], device: torch.device
    ) -> ModelInputs:
        if isinstance(cond, Conditioning):
            layout = DEFAULT_BATCH_CFG if batch_cfg is None else batch_cfg
            return self.prepare_model_inputs(cond, guidance_scale, layout, device=device)
        if not isinstance(cond, ModelInputs):
            raise TypeError(f"cond must be a Conditioning or ModelInputs, got {type(cond).__name__}")
        if cond.guided != (guidance_scale > 1):
            raise ValueError(
                f"guidance_scale={guidance_scale} but the model inputs were prepared "
                f"{'with' if cond.guided else 'without'} guidance"
            )
        if batch_cfg is not None and batch_cfg != AUTO and batch_cfg != cond.batch_cfg and cond.guided:
            raise ValueError(
                f"batch_cfg={batch_cfg} but the model inputs were prepared with batch_cfg={cond.batch_cfg}"
            )
        return cond

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rl_generate(
        self,
        prompt: str,
        seeds: Sequence[int],
        params: DiffusionSamplingParams,
        interrupt: Optional[Callable[[], bool]] = None,
    ) -> RLBatchOutput:
        """``len(seeds)`` images of ``prompt``; sample i's noise comes only from ``seeds[i]``, so a batched call
        equals single calls with the same seeds. ``interrupt()`` (a host-side flag) is checked between denoising
        steps; True raises :class:`~verl_omni.pipelines.common.RequestAborted`."""
        seeds = [int(s) for s in seeds]
        sigmas, model_timesteps = self.rl_schedule(params)  # first: the scheduler may still reject the request

        negative_prompt = negative_prompt_for(params, logger, f"{type(self).__name__}_empty_negative")
        encoded = self.encode_conditions(prompt, negative_prompt, params)
        cond = encoded.conditioning.repeat(len(seeds))
        return self._sample(cond, seeds, params, sigmas, model_timesteps, interrupt, encoded.truncated_prompt_tokens)

    @torch.no_grad()
    def rl_generate_rows(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        params: DiffusionSamplingParams,
        interrupt: Optional[Callable[[], bool]] = None,
    ) -> RLBatchOutput:
        """One call of ``len(seeds)`` rows where row i is an image of ``prompts[i]`` from ``seeds[i]`` (several
        prompts in one batch, e.g. an evaluation's). Each distinct prompt is encoded alone, as :meth:`rl_generate`
        encodes it, and the negative prompt once for every row; texts of different lengths are right-padded with
        mask 0 (:meth:`Conditioning.cat`), which masked attention makes invisible to the real tokens, so row i
        equals ``rl_generate(prompts[i], [seeds[i]], params)`` within float rounding. One prompt for every row is
        :meth:`rl_generate` itself. ``truncated_prompt_tokens``: the sum over the distinct prompts."""
        prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
        if not seeds or len(prompts) != len(seeds):
            raise ValueError(f"rl_generate_rows needs one prompt per seed, got {len(prompts)} prompts and {len(seeds)}")
        if len(set(prompts)) == 1:
            return self.rl_generate(prompts[0], seeds, params, interrupt)
        sigmas, model_timesteps = self.rl_schedule(params)
        negative_prompt = negative_prompt_for(params, logger, f"{type(self).__name__}_empty_negative")
        encoded: dict[str, EncodedPrompt] = {}
        for prompt in dict.fromkeys(prompts):  # the negative prompt with the first one only: the same for every row
            encoded[prompt] = self.encode_conditions(prompt, None if encoded else negative_prompt, params)
        first = next(iter(encoded.values())).conditioning
        negative = {name: getattr(first, name) for name in NEGATIVE_FIELDS}
        cond = Conditioning.cat([dataclasses.replace(encoded[p].conditioning, **negative) for p in prompts])
        truncated = sum(e.truncated_prompt_tokens for e in encoded.values())
        return self._sample(cond, seeds, params, sigmas, model_timesteps, interrupt, truncated)

    def _sample(
        self,
        cond: Conditioning,
        seeds: list[int],
        params: DiffusionSamplingParams,
        sigmas: torch.Tensor,
        model_timesteps: torch.Tensor,
        interrupt: Optional[Callable[[], bool]],
        truncated_prompt_tokens: int,
    ) -> RLBatchOutput:
        """Denoise and decode ``len(seeds)`` rows conditioned on ``cond`` (one row per seed)."""
        device = self._execution_device
        generators = make_generators(seeds)
        latents = self.prepare_rl_latents(len(seeds), params, generators, device)
        # Prepared once for the whole request: the denoising loop below never waits for the device.
        model_inputs = self.prepare_model_inputs(cond, params.guidance_scale, params.batch_cfg, device=latents.device)
        result = denoise_with_logprobs(
            lambda x, t: self.predict_velocity(x, t, model_inputs, params.guidance_scale, params.height, params.width),
            latents,
            sigmas,
            model_timesteps,
            params,
            generators,
            interrupt,
            tail_schedule=lambda start, points: self.rl_tail_schedule(params, start, points),
        )
        images = decode_in_batches(
            lambda latents: self.decode_rl_latents(latents, params), result.final_latents, params.vae_decode_batch
        )
        return to_batch_output(
            images, result, sigmas, model_timesteps, cond, seeds, truncated_prompt_tokens, params.to_dict()
        )


__all__ = ["DEFAULT_BATCH_CFG", "EncodedPrompt", "RLPipelineMixin"]
