"""What one evaluation is: the model, the prompts, the protocol, the rewards and where the report goes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from verl_omni.eval.protocol import EvalProtocol
from verl_omni.pipelines import AUTO, family_for_model_dir, get_family

logger = logging.getLogger(__name__)


@dataclass
class EvalJob:
    """Everything one evaluation needs; ``run_evaluation`` writes its report under ``out``."""

    base: str  # a diffusers pipeline directory
    prompts: str  # a prompt file (prompts.py)
    out: str
    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    rewards: list[dict] = field(default_factory=lambda: [{"name": "ocr", "weight": 1.0}])
    checkpoint: Optional[str] = None  # a global_step_<k> dir or a run dir; None: the base pipeline alone
    weights: str = "lora"  # lora | ema (export.WEIGHTS_CHOICES)
    lora_alpha: Optional[float] = None  # only for checkpoints that do not record it
    pipeline: str = AUTO  # the model family; auto: from the base's model_index.json
    engine: str = "diffusers"
    device: str = "auto"  # auto: cuda where a GPU is visible, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    prompt_key: str = "prompt"
    limit: Optional[int] = None  # the first ``limit`` prompts of the file
    save_every: int = 16  # prompts between report rewrites
    prompts_per_grid: int = 16
    overwrite: bool = False
    progress: Optional[bool] = None  # tqdm's disable=None: a bar on a terminal only
    gpus: int = 1  # worker processes, one engine each (workers.py); 1: the engine runs in this process
    # prompts whose images may wait for saving and scoring while the engine goes on; 0: serial; None: one engine
    # call's prompts, at least 2 (prefetch_prompts)
    prefetch: Optional[int] = None
    # images per engine call: consecutive prompts share a call, whole prompts only (prompts_per_call)
    batch_images: int = 16
    # The family's own options section (actor_rollout_ref.model.<family>, e.g. FLUX's distilled_guidance_scale) for
    # the engine's pipeline; what a key leaves out keeps its default
    family_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._resolve_device_and_dtype()
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise ValueError(f"--gpus must be an int >= 1 (worker processes, one per GPU), got {self.gpus!r}")
        if self.prefetch is not None and (
            isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0
        ):
            raise ValueError(
                f"--prefetch must be an int >= 0 (prompts generated ahead of their scoring), got {self.prefetch!r}"
            )

        if isinstance(self.batch_images, bool) or not isinstance(self.batch_images, int) or self.batch_images < 1:
            raise ValueError(
                f"--batch-images must be an int >= 1 (images per engine call, whole prompts), got {self.batch_images!r}"
            )

    def _resolve_device_and_dtype(self) -> None:
        """``auto`` device and dtype made concrete (the report records what ran); an engine on a device it cannot
        run on is refused before anything loads."""
        if self.device == AUTO:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            logger.info("--device auto: %s", self.device)
        if self.dtype == AUTO:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
            logger.info("--dtype auto: %s on %s", self.dtype, self.device)
        if self.engine == "vllm_omni" and self.device == "cpu":
            raise ValueError(
                "--engine vllm_omni runs on a GPU, got --device cpu: pass --device cuda (or auto, the default, where "
                "a GPU is visible), or evaluate with --engine diffusers on the CPU"
            )

    def prompts_per_call(self) -> int:
        """Prompts whose images one engine call generates: as many whole prompts as ``batch_images`` holds, at
        least one (a prompt of more images than ``batch_images`` is a call of its own; prompts are never split)."""
        return max(1, self.batch_images // self.protocol.images_per_prompt)

    def prefetch_prompts(self) -> int:
        """``prefetch``; by default one call's prompts (at least 2, the bound with one prompt a call), so a call's
        scoring overlaps the next call's generation whatever ``batch_images`` is."""
        return self.prefetch if self.prefetch is not None else max(2, self.prompts_per_call())

    def model_options(self) -> dict:
        """``family_options`` as ``ModelConfig`` keywords (``{<family>: {...}}``; nothing when empty)."""
        if not self.family_options:
            return {}
        family = self.family()
        if get_family(family).options_class is None:
            raise ValueError(
                f"--family-option {sorted(self.family_options)}: the {family} family has no options section "
                f"(actor_rollout_ref.model.{family})"
            )
        return {family: dict(self.family_options)}

    def family(self) -> str:
        """The model family: ``pipeline``, or with auto the one serving the base's model_index.json."""
        return family_for_model_dir(self.base) if self.pipeline == AUTO else self.pipeline
