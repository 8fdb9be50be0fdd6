"""LoRA on a diffusion transformer, the same way on the actor and in every engine.

Both sides add the adapter with diffusers' ``add_adapter`` (peft underneath) and exchange peft state-dict
tensors (``get_peft_model_state_dict`` names), so a checksum computed on either side is comparable.

The adapter's weights are float32 (the actor's master weights, which the hybrid engine serves as they are), but
its two matmuls run in the activations' dtype (bf16 at the real size), as autocast would run them: peft's default
casts every activation entering a LoRA layer to float32 and adds a float32 product to the bf16 output, which
moves about three times the activation's bytes per wrapped projection in every rollout forward and twice again
in training (see ``compute_lora_in_activation_dtype``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoRASpec:
    """The adapter's shape: rank, alpha and the module names it wraps (empty = DEFAULT_TARGET_MODULES)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ()


def add_lora_adapter(transformer: torch.nn.Module, spec: LoRASpec) -> None:
    targets = list(spec.target_modules) or list(DEFAULT_TARGET_MODULES)
    names = [name for name, _ in transformer.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(
            f"actor_rollout_ref.model.target_modules {unmatched} match no module of the transformer "
            f"(examples of module names: {names[1:6]})"
        )
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=targets, init_lora_weights=True)
    transformer.add_adapter(config)
    compute_lora_in_activation_dtype(transformer)


class ExpertModules(torch.nn.Module):
    """Several transformers of one pipeline (Wan2.2-T2V-A14B's high- and low-noise experts) as one module for the
    adapter: :func:`add_lora_adapter` gives each the same adapter, the state-dict functions here name each tensor by
    its transformer (``transformer.blocks...``, ``transformer_2.blocks...``), and the adapter switches reach each."""

    def __init__(self, experts: dict[str, torch.nn.Module]):
        super().__init__()
        for name, expert in experts.items():
            self.add_module(name, expert)

    @property
    def peft_config(self) -> dict:
        """The first expert's (every expert's adapter has the same config)."""
        return next(iter(self.children())).peft_config

    def add_adapter(self, config: LoraConfig) -> None:
        for expert in self.children():
            expert.add_adapter(config)

    def disable_adapters(self) -> None:
        for expert in self.children():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.children():
            expert.enable_adapters()


class ActivationDtypeLinear(torch.nn.Linear):
    """A LoRA factor (peft's ``lora_A`` / ``lora_B``, an ``nn.Linear``) that computes in its input's dtype.

    Its weight keeps its own dtype (float32: what the optimizer steps and checkpoints save); the matmul takes a
    copy in the input's dtype (r x width elements, a few hundred KB), and autograd carries the gradient back to the
    float32 weight. With a float32 input nothing changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def compute_lora_in_activation_dtype(transformer: torch.nn.Module, enabled: bool = True) -> int:
    """Run every LoRA layer's adapter matmuls in the dtype of the activations reaching it (``enabled``), or as
    peft does by default, in the adapter weights' dtype (``enabled=False``: every activation cast to float32).

    Uses peft's own switch for the input cast (``cast_input_dtype_enabled``, which ``peft.helpers.
    disable_input_dtype_casting`` sets) and gives the factors :class:`ActivationDtypeLinear`'s forward. Call it
    before ``torch.compile`` wraps the blocks. Returns the number of LoRA layers changed."""
    changed = 0
    for module in transformer.modules():
        if not isinstance(module, LoraLayer):
            continue
        module.cast_input_dtype_enabled = not enabled
        for factor in (*module.lora_A.values(), *module.lora_B.values()):
            if type(factor) in (torch.nn.Linear, ActivationDtypeLinear):
                factor.__class__ = ActivationDtypeLinear if enabled else torch.nn.Linear
        changed += 1
    return changed


class LoRAParts(NamedTuple):
    """A LoRA layer's output in two parts: ``base + delta * scaling`` is what the layer returns (delta None: a
    projection without an adapter product, ``base`` alone)."""

    base: torch.Tensor
    delta: Optional[torch.Tensor] = None  # lora_B(lora_A(x)), before the scaling
    scaling: float = 1.0

    def total(self) -> torch.Tensor:
        """The layer's output, added up with peft's own operations (the same roundings)."""
        return self.base if self.delta is None else self.base + self.delta * self.scaling


class PlainLoRA(NamedTuple):
    """The pieces of a plain LoRA linear: ``base(x) + lora_B(lora_A(x)) * scaling`` is its output."""

    base: torch.nn.Module
    lora_A: torch.nn.Module
    lora_B: torch.nn.Module
    scaling: float


def plain_lora(layer: torch.nn.Module, x: torch.Tensor) -> Optional[PlainLoRA]:
    """``layer``'s pieces if it is a plain LoRA linear for the input ``x``: peft's ``lora.Linear`` with one active,
    unmerged, enabled adapter, no dropout, no variant such as DoRA, and no cast of ``x`` to float32 on the way in
    (the adapter's product then comes out in the base output's dtype); None otherwise."""
    if not isinstance(layer, LoraLinear) or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    if layer.cast_input_dtype_enabled and layer.lora_A[name].weight.dtype != x.dtype:
        return None
    return PlainLoRA(layer.base_layer, layer.lora_A[name], layer.lora_B[name], float(layer.scaling[name]))


def lora_parts(layer: torch.nn.Module, x: torch.Tensor) -> Optional[LoRAParts]:
    """``layer(x)`` as :class:`LoRAParts`, so a kernel can add the adapter's product where it reads the projection
    anyway (models/qk_norm_rope.py); None where ``layer`` is not a plain LoRA linear (:func:`plain_lora`) or the
    product would not come out in the base output's dtype: then call ``layer(x)``."""
    lora = plain_lora(layer, x)
    if lora is None:
        return None
    base = lora.base(x)
    delta = lora.lora_B(lora.lora_A(x))
    if delta.dtype != base.dtype:
        return None
    return LoRAParts(base, delta, lora.scaling)


def _stackable_linear(module: torch.nn.Module, x: torch.Tensor, adapter_factor: bool) -> bool:
    """A plain ``nn.Linear`` (or an adapter factor computing in the activations' dtype) whose matmul in ``x``'s
    dtype is ``F.linear(x, weight, bias)``: such layers can share one matmul over stacked weights."""
    if type(module) is ActivationDtypeLinear:
        return adapter_factor and module.bias is None
    if type(module) is not torch.nn.Linear or module.weight.dtype != x.dtype:
        return False
    return not adapter_factor or module.bias is None


def fused_projections(layers: Sequence[torch.nn.Module], x: torch.Tensor) -> Optional[list[LoRAParts]]:
    """Every layer's output on the same input ``x`` as :class:`LoRAParts`, from ONE matmul: the layers' weights and
    their adapters' ``lora_A`` weights stacked (a copy per call, the weights' bytes twice), so ``x`` is read once
    instead of once per layer and per adapter; each adapter's ``lora_B`` then runs on its slice of the result. For
    forwards without a gradient (the rollout): the stacked copy would otherwise sit in autograd's graph.

    The parts are column slices of one buffer (not contiguous). Each element is the same dot product as the
    layer's own matmul, but the GEMM library may tile a wider matrix differently: equal within the dtype's
    rounding, not bit for bit. None where a layer is neither a plain ``nn.Linear`` in ``x``'s dtype nor a plain
    LoRA linear over one (:func:`plain_lora`), or where the layers disagree on having a bias."""
    bases, loras = [], []
    for layer in layers:
        lora = plain_lora(layer, x)
        base = layer if lora is None else lora.base
        if not _stackable_linear(base, x, adapter_factor=False):
            return None
        if lora is not None and not (
            _stackable_linear(lora.lora_A, x, adapter_factor=True) and _stackable_linear(lora.lora_B, x, True)
        ):
            return None
        bases.append(base)
        loras.append(lora)
    if len({base.bias is None for base in bases}) != 1:
        return None
    adapters = [lora for lora in loras if lora is not None]
    weights = [base.weight for base in bases] + [lora.lora_A.weight.to(x.dtype) for lora in adapters]
    bias = None
    if bases[0].bias is not None:
        zeros = [x.new_zeros(lora.lora_A.weight.shape[0]) for lora in adapters]
        bias = torch.cat([base.bias for base in bases] + zeros)
    stacked = F.linear(x, torch.cat(weights), bias)
    sizes = [w.shape[0] for w in weights]
    outputs = stacked.split(sizes, dim=-1)
    parts, hidden = [], iter(outputs[len(bases) :])
    for base_out, lora in zip(outputs[: len(bases)], loras, strict=True):
        if lora is None:
            parts.append(LoRAParts(base_out))
        else:
            parts.append(LoRAParts(base_out, lora.lora_B(next(hidden)), lora.scaling))
    return parts


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's parameters, in module order (what the optimizer trains)."""
    return [p for name, p in transformer.named_parameters() if "lora_" in name]


def init_lora_weights(transformer: torch.nn.Module, seed: int) -> None:
    """Re-initialise the adapter as peft does (A: Kaiming-uniform with a=sqrt(5), B: zeros, so the adapter starts as
    the identity), from a CPU generator seeded with ``seed``: the same weights in every process and on every device
    (the hybrid engine's ranks each build their adapter in their own process)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, param in sorted(transformer.named_parameters(), key=lambda kv: kv[0]):
            if "lora_A" in name:
                value = torch.empty(param.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
                param.copy_(value)
            elif "lora_B" in name:
                param.zero_()


def get_lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(transformer).items()}


def set_lora_state_dict(transformer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = set(get_peft_model_state_dict(transformer))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"LoRA tensors do not match the adapter: missing {missing}, unexpected {extra}")
    result = set_peft_model_state_dict(transformer, tensors)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA tensors not loaded: {result.unexpected_keys[:3]}")
