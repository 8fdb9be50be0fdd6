"""``actor_rollout_ref.model.qwen_image``: Qwen-Image's own speed options, for forwards without a gradient in the
vllm-omni engine (where it serves FA3; the diffusers engine keeps diffusers' attention). Each is measured in
docs/performance.md and checked for equal results by its test."""

from __future__ import annotations

from dataclasses import dataclass

from verl_omni.core.section import Section, require_bool


@dataclass
class QwenImageOptions(Section):
    _prefix = "actor_rollout_ref.model.qwen_image"

    # q/k RMSNorm + RoPE + the joint [text, image] cat as one Triton kernel (models/qk_norm_rope.py).
    qk_norm_rope_kernel: bool = True
    # With the q/k kernel (ignored without it): a plain LoRA's product on the q/k projections is added inside the
    # kernel, rounded as peft adds it (the same numbers), so the sum is never written to memory.
    qk_kernel_adds_lora: bool = True
    # Each stream's q, k, v projections (and their adapters' lora_A) as one matmul over stacked weights
    # (models/lora.fused_projections), so each stream's input is read once. Equal within bf16 rounding (a wider GEMM
    # may tile differently). Off: it gains nothing on top of qk_kernel_adds_lora.
    fuse_qkv_projections: bool = False
    # to_out over every row of the joint [text, image] attention output, the text rows then dropped, instead of
    # copying the image rows out first (a GEMM cannot read them in place: they are not evenly strided across the
    # batch). Costs to_out FLOPs on the text rows and saves more.
    project_joint_attention_output: bool = True

    def __post_init__(self) -> None:
        for name in (
            "qk_norm_rope_kernel",
            "qk_kernel_adds_lora",
            "fuse_qkv_projections",
            "project_joint_attention_output",
        ):
            require_bool(self.key(name), getattr(self, name))

    def attention_options(self) -> dict[str, bool]:
        """``QwenImageRLPipeline.use_attention_function``'s keyword options (the processor's names). The q/k LoRA
        goes into the kernel only where the kernel runs."""
        return {
            "qk_kernel": self.qk_norm_rope_kernel,
            "lora_in_kernel": self.qk_norm_rope_kernel and self.qk_kernel_adds_lora,
            "fuse_projections": self.fuse_qkv_projections,
            "project_joint_output": self.project_joint_attention_output,
        }
