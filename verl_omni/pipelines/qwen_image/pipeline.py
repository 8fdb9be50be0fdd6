"""Qwen-Image RL pipeline: the diffusers ``QwenImagePipeline`` plus the RL hooks of ``pipelines/base.py``.

``rl_generate`` and the trainer's log-prob recomputation both go through ``predict_velocity`` (true CFG with
diffusers' norm rescaling, by default both branches in one forward of 2B rows with the shorter text padded and
masked: see ``pipelines/model_inputs.py``), so rollout and training share one code path.

Timesteps: ``RLBatchOutput.timesteps`` holds what this transformer receives, ``t / 1000`` in [0, 1] (the stock
pipeline divides by 1000 before calling it); ``sigmas`` are the scheduler's, as diffusers computes them with
dynamic shifting for the packed image sequence length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.models.lora import LoRAParts, fused_projections, lora_parts
from verl_omni.pipelines.base import EncodedPrompt, RLPipelineMixin
from verl_omni.pipelines.common import to_uint8_images
from verl_omni.pipelines.model_inputs import TextInputs

logger = logging.getLogger(__name__)

# The stock pipeline hard-codes 34: the token count of its template prefix under the real Qwen2.5-VL tokenizer.
STOCK_TEMPLATE_START_IDX = 34
MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline.check_inputs limit


def template_prefix_length(tokenizer, template: str) -> int:
    """Tokens of ``template`` before the prompt slot, tokenized as the pipeline tokenizes the full text.

    Gives 34 for the real Qwen2.5-VL tokenizer and the right (longer) value for scratch tokenizers.
    """
    prefix = template.split("{}")[0]
    return len(tokenizer(prefix).input_ids)


# (q, k, v) [B, S, H, D] -> [B, S, H, D] (or (out, lse)): a fused attention kernel without a mask, e.g. FA3.
AttentionFn = Callable[..., torch.Tensor]
FLASH_DTYPES = (torch.bfloat16, torch.float16)  # what flash kernels take


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb_qwen(use_real=False)`` in real arithmetic: the same float32 products, but
    torch.compile can fuse it (complex tensors are not fused by inductor). x [B, S, H, D]; cos/sin [S, 1, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(3).type_as(x)


def _rotate_swapped(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`_rotate` as one elementwise expression over the flat head dim, with the same float32 products:
    ``out[2i] = x[2i] cos_i - x[2i+1] sin_i`` and ``out[2i+1] = x[2i+1] cos_i + x[2i] sin_i``. Nothing is stacked,
    so inductor may fuse the rotation with the RMSNorm before it and the cat after it into fewer passes (the stacked
    form compiled to three passes over q and k at the real size). x [B, S, H, D]; cos/sin [S, 1, D/2]."""
    xf = x.float()
    partner = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # x[d ^ 1]
    cos_full = cos.repeat_interleave(2, dim=-1)
    sin_signed = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return (xf * cos_full + partner * sin_signed).type_as(x)


# How QwenImageFusedAttnProcessor writes RoPE: "pairs" (the default) stacks the rotated halves; "swapped" is one
# elementwise expression. Both give the same numbers; compiled at the real size they run equally fast within the
# spread between runs (docs/benchmarks/pipeline_breakdown_h200_L60.json, run c), so "pairs" stays.
ROPE_FORMS = {"pairs": _rotate, "swapped": _rotate_swapped}


class QwenImageFusedAttnProcessor:
    """Qwen-Image's joint (text + image) attention as diffusers' ``QwenDoubleStreamAttnProcessor2_0`` computes it,
    with two differences that only change speed: RoPE in real arithmetic (fusable by torch.compile) and, when there
    is no attention mask, ``attention_fn`` (an engine's fused kernel such as FA3) instead of SDPA. With a mask
    (padded text, e.g. batched CFG whose prompt and negative prompt differ in length), float32 or a head dim the
    kernel lacks, it uses diffusers' dispatcher (SDPA with the mask): acceptable, since attention is ~2% of the
    transformer's FLOPs at 1024 image tokens."""

    def __init__(
        self,
        attention_fn: AttentionFn,
        rope: str = "pairs",
        qk_kernel: bool = False,
        lora_in_kernel: bool = False,
        fuse_projections: bool = False,
        project_joint_output: bool = False,
    ):
        if rope not in ROPE_FORMS:
            raise ValueError(f"rope={rope!r}: allowed values are {sorted(ROPE_FORMS)}")
        if lora_in_kernel and not qk_kernel:
            raise ValueError("lora_in_kernel=True needs qk_kernel=True (the kernel adds the LoRA's product)")
        # With the kernel: a plain LoRA on the q/k projections hands the kernel its base output and its product
        # (models/lora.lora_parts), which the kernel adds as peft does, so the sum is never written to memory.
        self.lora_in_kernel = lora_in_kernel
        # Without a gradient, each stream's q, k, v (and their adapters' lora_A) from one matmul over stacked
        # weights, so the stream's input is read once instead of three to six times (models/lora.fused_projections).
        self.fuse_projections = fuse_projections
        # Without a gradient, to_out over every row of the joint attention output (the text rows too, then dropped):
        # the output is read where it lies instead of copying the image rows out first (they are not evenly strided
        # across the batch, so a GEMM cannot read them in place). The text rows cost to_out FLOPs (14-256 text
        # tokens against 1024 image tokens), less than the copy saves (model.project_joint_attention_output).
        self.project_joint_output = project_joint_output
        self.attention_fn = attention_fn
        self.rotate = ROPE_FORMS[rope]
        # q/k RMSNorm + RoPE + the joint cat in one Triton kernel where nothing needs a gradient
        # (models/qk_norm_rope.py); imported only when asked for, since Triton is a GPU-side dependency.
        self.qk_kernel = None
        if qk_kernel:
            from verl_omni.models import qk_norm_rope

            self.qk_kernel = qk_norm_rope

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        if encoder_hidden_states is None:
            raise ValueError("QwenImageFusedAttnProcessor requires encoder_hidden_states (text stream)")
        seq_txt, heads = encoder_hidden_states.shape[1], attn.heads
        txt = encoder_hidden_states
        img_q, img_k, img_v = self._projections((attn.to_q, attn.to_k, attn.to_v), hidden_states)
        txt_q, txt_k, txt_v = self._projections((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), txt)
        value = torch.cat([txt_v.total(), img_v.total()], dim=1).unflatten(-1, (heads, -1))  # [text, image]
        bases = tuple(p.base for p in (img_q, txt_q, img_k, txt_k))
        if self._kernel_applies(attn, bases, image_rotary_emb):
            img_freqs, txt_freqs = image_rotary_emb
            img_rope, txt_rope = torch.view_as_real(img_freqs), torch.view_as_real(txt_freqs)
            query = self._joint(txt_q, img_q, attn.norm_added_q, attn.norm_q, txt_rope, img_rope, heads)
            key = self._joint(txt_k, img_k, attn.norm_added_k, attn.norm_k, txt_rope, img_rope, heads)
            return self._attend(attn, query, key, value, attention_mask, seq_txt)
        img_q, txt_q, img_k, txt_k = (p.total() for p in (img_q, txt_q, img_k, txt_k))
        img_q, img_k = attn.norm_q(img_q.unflatten(-1, (heads, -1))), attn.norm_k(img_k.unflatten(-1, (heads, -1)))
        txt_q = attn.norm_added_q(txt_q.unflatten(-1, (heads, -1)))
        txt_k = attn.norm_added_k(txt_k.unflatten(-1, (heads, -1)))
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_cos, img_sin = img_freqs.real[:, None], img_freqs.imag[:, None]
            txt_cos, txt_sin = txt_freqs.real[:, None], txt_freqs.imag[:, None]
            img_q, img_k = self.rotate(img_q, img_cos, img_sin), self.rotate(img_k, img_cos, img_sin)
            txt_q, txt_k = self.rotate(txt_q, txt_cos, txt_sin), self.rotate(txt_k, txt_cos, txt_sin)
        query = torch.cat([txt_q, img_q], dim=1)
        key = torch.cat([txt_k, img_k], dim=1)
        return self._attend(attn, query, key, value, attention_mask, seq_txt)

    def _projections(self, layers, x) -> list[LoRAParts]:
        """``layer(x)`` for the stream's q, k and v projections, as :class:`LoRAParts`. Without a gradient: from one
        stacked matmul with ``fuse_projections``, and base and adapter product apart with ``lora_in_kernel``;
        otherwise each layer's whole output as the base."""
        if torch.is_grad_enabled():
            return [LoRAParts(layer(x)) for layer in layers]
        parts = fused_projections(layers, x) if self.fuse_projections else None
        if parts is None:
            split = [lora_parts(layer, x) if self.lora_in_kernel else None for layer in layers]
            parts = [LoRAParts(layer(x)) if p is None else p for layer, p in zip(layers, split, strict=True)]
        if not self.lora_in_kernel:
            parts = [LoRAParts(p.total()) for p in parts]
        return parts

    def _joint(self, txt: LoRAParts, img: LoRAParts, txt_norm, img_norm, txt_rope, img_rope, heads):
        """The Triton kernel's joint q or k; a projection's adapter product, if split off, is added inside it."""
        return self.qk_kernel.joint_qk_norm_rope(
            txt.base, img.base, txt_norm.weight, img_norm.weight, txt_rope, img_rope, heads, img_norm.eps,
            txt.delta, img.delta, txt.scaling, img.scaling,
        )  # fmt: skip

    def _kernel_applies(self, attn, projections, image_rotary_emb) -> bool:
        """The Triton q/k kernel is on and computes here what the eager path would for each of the projections
        (img_q, txt_q, img_k, txt_k) with its norm and frequencies, one eps per joint tensor (see
        ``qk_norm_rope.kernel_applies``)."""
        if self.qk_kernel is None or image_rotary_emb is None:
            return False
        img_freqs, txt_freqs = image_rotary_emb
        norms = (attn.norm_q, attn.norm_added_q, attn.norm_k, attn.norm_added_k)
        pairs = zip(projections, norms, (img_freqs, txt_freqs, img_freqs, txt_freqs), strict=True)
        same_eps = attn.norm_q.eps == attn.norm_added_q.eps and attn.norm_k.eps == attn.norm_added_k.eps
        return same_eps and all(self.qk_kernel.kernel_applies(x, n, f, attn.heads) for x, n, f in pairs)

    def _attend(self, attn, query, key, value, attention_mask, seq_txt):
        # The engine's kernel has no backward (fa3-fwd): a training forward (the hybrid engine's actor on the same
        # module) goes through SDPA, whose flash / cuDNN kernels have one.
        fused = attention_mask is None and query.dtype in FLASH_DTYPES and query.shape[-1] <= 256
        if fused and not (torch.is_grad_enabled() and query.requires_grad):
            out = self.attention_fn(query, key, value, causal=False, softmax_scale=query.shape[-1] ** -0.5)
            out = out[0] if isinstance(out, tuple) else out
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).to(query.dtype)
        if self.project_joint_output and not torch.is_grad_enabled():
            img_out = attn.to_out[0](out)[:, seq_txt:]
        else:
            img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(out[:, :seq_txt].contiguous())


class SingleFrameCausalConv3d(QwenImageCausalConv3d):
    """The VAE's causal 3D conv, with a shortcut for what image decoding feeds it: one frame and no cache.

    Causal padding puts ``kt - 1`` zero frames before that frame, so only the kernel's last temporal slice meets
    data: a 2D convolution with that slice is the same sum with 1/kt of the work (kt = 3 in Qwen-Image's decoder).
    Anything else (video, a cache) takes the 3D path."""

    def forward(self, x, cache_x=None):
        kt = self.kernel_size[0]
        if (
            cache_x is None
            and x.shape[2] == 1
            and self._padding[4] == kt - 1
            and self._padding[5] == 0
            and self.stride[0] == 1
            and tuple(self.dilation) == (1, 1, 1)
        ):
            pad_w, _, pad_h, _ = self._padding[:4]
            out = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=(pad_h, pad_w))
            return out.unsqueeze(2)
        return super().forward(x, cache_x)


class EncodedText(NamedTuple):
    embeds: torch.Tensor  # [1, L, D]
    mask: torch.Tensor  # [1, L] int64, all ones (kept so rows of different prompts can be padded and stacked)
    truncated_tokens: int  # tokens cut off at max_sequence_length


class QwenImageRLPipeline(RLPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` (same components, loadable with ``from_pretrained``) with ``rl_generate`` and
    ``predict_velocity`` (``RLPipelineMixin``)."""

    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH
    SUPPORTS_TEXT_MASK = True  # encoder_hidden_states_mask: padded CFG branches can share one forward
    MODEL_TIMESTEP_DIVISOR = 1000  # the transformer receives t / 1000, as the stock pipeline passes it
    # flow_grpo's Qwen-Image trainer (scripts/train_qwenimage.py): gradients flow through both CFG branches and
    # every row trains, zero advantage or not.
    REFERENCE_TRAINER_DEFAULTS = {"flowgrpo": {"detach_unconditional": False, "drop_zero_advantage": False}}

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        # Drop exactly the template prefix, whatever tokenizer was saved (the stock value 34 is only right for
        # the real tokenizer; with a scratch one it would leak template tokens into the embeddings).
        if tokenizer is not None:
            self.prompt_template_encode_start_idx = template_prefix_length(tokenizer, self.prompt_template_encode)

    @property
    def has_unmasked_attention_kernel(self) -> bool:
        """An engine's kernel is installed (``use_attention_function``) and takes this transformer's dtype."""
        return getattr(self, "_attention_fn", None) is not None and self.transformer.dtype in FLASH_DTYPES

    def use_attention_function(self, attention_fn: AttentionFn, **options: Any) -> int:
        """Route every joint-attention block through :class:`QwenImageFusedAttnProcessor` with ``attention_fn``
        (an engine's fused kernel) and the processor's keyword ``options``: the RoPE form ``rope`` (see
        ``ROPE_FORMS``); ``qk_kernel``, q/k prepared by the Triton kernel of ``models/qk_norm_rope.py`` where no
        gradient is needed (with ``lora_in_kernel``, the q/k LoRA's product added inside it);
        ``fuse_projections``, each stream's q, k, v from one matmul there; ``project_joint_output``, to_out over the
        whole joint attention output there. Returns the number of blocks changed."""
        self._attention_fn = attention_fn
        blocks = [
            m
            for m in self.transformer.modules()
            if isinstance(
                getattr(m, "processor", None), (QwenDoubleStreamAttnProcessor2_0, QwenImageFusedAttnProcessor)
            )
        ]
        for module in blocks:
            module.set_processor(QwenImageFusedAttnProcessor(attention_fn, **options))
        return len(blocks)

    # ------------------------------------------------------------------------------------------ prompts
    def encode_prompt_for_rl(self, prompt: str, max_sequence_length: int) -> EncodedText:
        """The prompt's embeddings, at most ``max_sequence_length`` tokens, and how many tokens were cut off.

        A cut is logged at DEBUG only: prompts longer than the limit are common in a data set, and the caller
        reports the count (``RLBatchOutput.truncated_prompt_tokens``) instead of a warning per prompt."""
        embeds, mask = self._get_qwen_prompt_embeds([prompt], device=self._execution_device)
        truncated = max(0, embeds.shape[1] - max_sequence_length)
        if truncated:
            logger.debug(
                "prompt of %d tokens truncated to max_sequence_length=%d: %.80r",
                embeds.shape[1],
                max_sequence_length,
                prompt,
            )
        return EncodedText(embeds[:, :max_sequence_length], mask[:, :max_sequence_length], truncated)

    def encode_conditions(
        self, prompt: str, negative_prompt: Optional[str], params: DiffusionSamplingParams
    ) -> EncodedPrompt:
        positive = self.encode_prompt_for_rl(prompt, params.max_sequence_length)
        cond = Conditioning(prompt_embeds=positive.embeds, prompt_embeds_mask=positive.mask)
        if negative_prompt is not None:
            negative = self.encode_prompt_for_rl(negative_prompt, params.max_sequence_length)
            cond.negative_prompt_embeds, cond.negative_prompt_embeds_mask = negative.embeds, negative.mask
        return EncodedPrompt(cond, positive.truncated_tokens)

    # ------------------------------------------------------------------------------------------ model call
    def transformer_velocity(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: TextInputs, height: int, width: int
    ) -> torch.Tensor:
        """One forward on packed ``latents`` [R, S, C]; ``text.mask`` None = every token real (unmasked attention,
        the engine's fused kernel when one is installed)."""
        latent_grid = (1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=text.embeds,
            encoder_hidden_states_mask=text.mask,
            img_shapes=[[latent_grid]] * latents.shape[0],
            return_dict=False,
        )[0]

    def combine_guidance(
        self, conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """True CFG as ``QwenImagePipeline``: ``u + w (c - u)``, rescaled per token to the conditional's norm."""
        combined = unconditional + guidance_scale * (conditional - unconditional)
        conditional_norm = torch.norm(conditional, dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return combined * (conditional_norm / combined_norm)

    # ------------------------------------------------------------------------------------------ schedule, latents
    def rl_base_sigmas(self, steps: int) -> Optional[np.ndarray]:
        return np.linspace(1.0, 1 / steps, steps)  # as QwenImagePipeline.__call__

    def rl_image_seq_len(self, params: DiffusionSamplingParams) -> int:
        return (params.height // self.vae_scale_factor // 2) * (params.width // self.vae_scale_factor // 2)

    def prepare_rl_latents(
        self,
        batch_size: int,
        params: DiffusionSamplingParams,
        generators: Sequence[torch.Generator],
        device: torch.device,
    ) -> torch.Tensor:
        """Packed x_T [B, S, C] as ``QwenImagePipeline.prepare_latents`` draws it from per-sample generators."""
        channels = self.transformer.config.in_channels // 4  # 2x2 patches packed into the channels
        return self.prepare_latents(
            batch_size, channels, params.height, params.width, torch.float32, device, list(generators)
        )

    def decode_rl_latents(self, latents: torch.Tensor, params: DiffusionSamplingParams) -> torch.Tensor:
        return self.decode_latents(latents, params.height, params.width)

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> uint8 [B, H, W, 3] (on the latents' device), as the stock pipeline's decode (latent
        mean / std undone)."""
        return to_uint8_images(self.decode_latents_to_pixels(latents, height, width))

    def decode_latents_to_pixels(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> [B, 3, H, W] in [-1, 1]."""
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
        z_dim = self.vae.config.z_dim
        latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents)
        latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents)
        latents = latents / latents_std + latents_mean
        if getattr(self.vae, "use_tiling", False):
            return self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        # One frame: the decoder without its frame cache is the same computation as ``vae.decode`` (whose first
        # frame sees no cache either) minus copying every activation into that cache, and its causal convs run
        # as 2D convs (SingleFrameCausalConv3d).
        self._use_single_frame_convs()
        return self.vae_decode(self.vae, latents).clamp(-1.0, 1.0)[:, :, 0]

    @staticmethod
    def vae_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """One frame through the decoder without its frame cache (``decode_latents_to_pixels``)."""
        return vae.decoder(vae.post_quant_conv(latents))

    def _use_single_frame_convs(self) -> None:
        # Our pipeline's own VAE instance, switched once at first decode; the class falls back to the 3D path
        # for anything but one uncached frame, so every other use of the VAE is unchanged.
        if getattr(self, "_single_frame_convs", False):
            return
        for module in list(self.vae.decoder.modules()) + [self.vae.post_quant_conv]:
            if type(module) is QwenImageCausalConv3d:
                module.__class__ = SingleFrameCausalConv3d
        self._single_frame_convs = True


__all__ = ["EncodedText", "QwenImageRLPipeline", "QwenImageFusedAttnProcessor", "template_prefix_length"]
