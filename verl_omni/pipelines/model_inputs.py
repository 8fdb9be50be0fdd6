"""The text side of transformer calls, prepared once per request or training micro-batch: ``ModelInputs``.

``predict_velocity`` runs at every denoising step (rollout) and for every stored transition (training). What
does not change between those calls is computed once here: the embeddings in the transformer's dtype and on
its device, the two classifier-free-guidance branches stacked into one batch, and whether a text mask is needed
at all. That last question ("is this mask all ones?") reads the mask on the host, a device sync; asked here it
costs one sync per request / micro-batch instead of one per forward.

Classifier-free guidance runs in one of two layouts:

- batched (the default): ONE call of 2B rows, ``[unconditional; conditional]`` (diffusers' order for classic CFG).
  The shorter text is right-padded to the longer with zero embeddings and mask 0. For Qwen-Image this changes
  nothing for real tokens: padded keys are masked out of the joint attention, every other text operation
  (norm, projections, modulation, MLP) is per token, and text RoPE positions are token indices (``QwenEmbedRope``
  takes ``pos_freqs[k]`` for text token k), so padding after the last real token moves no real token. Only float
  rounding differs (the masked softmax reduces over more, zero, terms; GEMMs see 2B rows).
- two calls of B rows, conditional then unconditional: what ``QwenImagePipeline`` does.
- ``"auto"`` (the rollout's default): batched, unless the batched call would need a text mask (the branches'
  texts differ in length) while the engine has a fused attention kernel that takes none (FA3 in the vllm-omni
  engine), or while the model takes no mask (SD3): then two calls, each unmasked, which at the real size is
  faster than one masked SDPA call (``docs/performance.md``). Without such a kernel (the diffusers engine, the
  actor's training forwards, which need a backward) the batched call stays.

A mask that is all ones is dropped (None), as ``QwenImagePipeline.encode_prompt`` does: the transformer then runs
unmasked attention, which lets an engine's fused kernel (FA3 in the vllm-omni engine) serve it. With the batched
layout that happens when both texts have the same length and no padding.

A text that keeps its mask is right-padded (the same zero embeddings, mask 0) to a multiple of
``MASKED_TEXT_MULTIPLE`` tokens. Why: the transformer builds its joint attention mask ``[R, 1, 1, text + image]``,
and inductor, compiling a training graph with a dynamic sequence length, guards on whether that row stride is a
multiple of 8 (the aligned-input check of its SDPA lowering). Prompts whose lengths fall on both sides of that
guard compiled the blocks' training graphs again mid-run (a recompilation of tens of seconds inside an update at
the real size). With the text a multiple of 8 the remainder is the image's alone, fixed for a resolution: one graph
per run. Unmasked calls have no mask tensor and no such guard, so they are left alone (padding would add a mask and
cost the fused kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from verl_omni.config.sampling import AUTO, BatchCfg, check_batch_cfg
from verl_omni.core.conditioning import Conditioning

MASKED_TEXT_MULTIPLE = 8  # masked texts are padded to a multiple of this many tokens (the module doc says why)


@dataclass(frozen=True)
class TextInputs:
    """The text inputs of ONE transformer call, final: rows in call order, the transformer's dtype and device.

    - ``embeds`` [R, L, D];
    - ``mask`` [R, L] (1 = token, 0 = padding), None when every token is real;
    - ``pooled`` [R, P] (SD3's pooled CLIP embeddings), None for models without them.
    """

    embeds: torch.Tensor
    mask: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])

    def full_mask(self) -> torch.Tensor:
        """The mask, with None spelled out as all ones."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.rows, self.length, dtype=torch.long, device=self.embeds.device)

    def padded_to(self, length: int) -> TextInputs:
        """Right-padded to ``length`` tokens: zero embeddings (finite through the text norm), mask 0."""
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"cannot pad {self.length} text tokens to {length}")
        if extra == 0:
            return self
        return TextInputs(F.pad(self.embeds, (0, 0, 0, extra)), F.pad(self.full_mask(), (0, extra)), self.pooled)

    def without_all_ones_mask(self) -> TextInputs:
        """The same inputs with an all-ones mask dropped (one host sync: call once, not per forward)."""
        if self.mask is not None and bool(self.mask.all()):
            return TextInputs(self.embeds, None, self.pooled)
        return self

    def final(self) -> TextInputs:
        """As one transformer call takes it: an all-ones mask dropped; a kept mask's text padded to a multiple of
        ``MASKED_TEXT_MULTIPLE`` tokens (the module doc). One host sync."""
        text = self.without_all_ones_mask()
        if text.mask is None:
            return text
        return text.padded_to(-(-text.length // MASKED_TEXT_MULTIPLE) * MASKED_TEXT_MULTIPLE)


@dataclass(frozen=True)
class ModelInputs:
    """A :class:`Conditioning` of B rows, prepared for a pipeline's ``predict_velocity`` (see the module doc).

    Exactly one layout is set: ``conditional`` alone (no guidance); ``conditional`` and ``unconditional`` (CFG as
    two calls of B rows); or ``joint`` (CFG as one call of 2B rows, ``[unconditional; conditional]``).
    """

    batch_size: int
    conditional: Optional[TextInputs] = None
    unconditional: Optional[TextInputs] = None
    joint: Optional[TextInputs] = None

    @property
    def guided(self) -> bool:
        """Whether an unconditional branch exists (classifier-free guidance)."""
        return self.joint is not None or self.unconditional is not None

    @property
    def batch_cfg(self) -> bool:
        return self.joint is not None


def stack_branches(unconditional: TextInputs, conditional: TextInputs) -> TextInputs:
    """``[unconditional; conditional]`` as one call's text, the shorter right-padded to the longer."""
    length = max(unconditional.length, conditional.length)
    unconditional, conditional = unconditional.padded_to(length), conditional.padded_to(length)
    mask = None
    if unconditional.mask is not None or conditional.mask is not None:
        mask = torch.cat([unconditional.full_mask(), conditional.full_mask()])
    pooled = None
    if conditional.pooled is not None:
        pooled = torch.cat([unconditional.pooled, conditional.pooled])
    return TextInputs(torch.cat([unconditional.embeds, conditional.embeds]), mask, pooled)


def prepare_model_inputs(
    cond: Conditioning,
    guided: bool,
    batch_cfg: BatchCfg,
    dtype: torch.dtype,
    device: torch.device | str,
    supports_text_mask: bool,
    requires_pooled: bool,
    model_name: str,
    unmasked_kernel: bool = False,
) -> ModelInputs:
    """``cond`` as :class:`ModelInputs`; raises ``ValueError`` naming the missing or unusable field.

    ``batch_cfg``: True, False or ``"auto"`` (the module doc). ``supports_text_mask``: the transformer takes a text
    mask (Qwen-Image); without one (SD3) the branches must have equal lengths to be batched and no mask may be
    given. ``requires_pooled``: pooled embeddings are needed. ``unmasked_kernel``: the transformer's attention has
    a fused kernel that serves only unmasked calls (what ``"auto"`` weighs).
    """
    check_batch_cfg("batch_cfg", batch_cfg)
    if guided and not cond.has_negative:
        raise ValueError(f"{model_name}: guidance needs negative_prompt_embeds in the conditioning")

    def branch(negative: bool) -> TextInputs:
        prefix = "negative_" if negative else ""
        embeds, mask, pooled = cond.branch(negative)
        if mask is not None and not supports_text_mask:
            raise ValueError(f"{model_name}: its transformer takes no text mask, got {prefix}prompt_embeds_mask")
        if requires_pooled and pooled is None:
            raise ValueError(f"{model_name}: needs {prefix}pooled_prompt_embeds")
        if embeds.shape[0] != cond.batch_size:
            raise ValueError(f"{prefix}prompt_embeds has {embeds.shape[0]} rows, prompt_embeds {cond.batch_size}")
        return TextInputs(
            embeds.to(device=device, dtype=dtype),
            None if mask is None else mask.to(device),
            None if pooled is None else pooled.to(device=device, dtype=dtype),
        )

    conditional = branch(negative=False)
    if not guided:
        return ModelInputs(cond.batch_size, conditional=conditional.final())
    unconditional = branch(negative=True)
    if batch_cfg == AUTO:
        joint = stack_branches(unconditional, conditional).final()
        if joint.mask is None or (supports_text_mask and not unmasked_kernel):
            return ModelInputs(cond.batch_size, joint=joint)
        batch_cfg = False
    if not batch_cfg:
        return ModelInputs(
            cond.batch_size,
            conditional=conditional.final(),
            unconditional=unconditional.final(),
        )
    if unconditional.length != conditional.length and not supports_text_mask:
        raise ValueError(
            f"{model_name}: negative_prompt_embeds has {unconditional.length} tokens and prompt_embeds "
            f"{conditional.length}; without a text mask they cannot share one call (use batch_cfg=False)"
        )
    return ModelInputs(cond.batch_size, joint=stack_branches(unconditional, conditional).final())


__all__ = ["MASKED_TEXT_MULTIPLE", "ModelInputs", "TextInputs", "prepare_model_inputs", "stack_branches"]
