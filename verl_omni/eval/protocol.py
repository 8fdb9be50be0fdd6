"""An evaluation protocol: how every image of an evaluation is sampled, and from which seed.

Presets name the anchors' protocols: ``flowgrpo_ocr`` is flow_grpo's OCR test protocol (40 denoising steps, CFG
4.5, no SDE noise, 512x512, one image per prompt, scored with the OCR reward) and ``geneval`` its GenEval setting
(the same sampler, four images per prompt, scored by a GenEval service through the ``http`` reward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from verl_omni.agent_loop.grouping import derive_seed
from verl_omni.config.sampling import DiffusionSamplingParams

SEED_SCHEMES = ("eval", "validation")


@dataclass(frozen=True)
class EvalProtocol:
    """Sampling settings of an evaluation (``--steps``, ``--cfg`` ... on the command line).

    ``seed_scheme='eval'``: image j of prompt i uses ``derive_seed(seed, "eval/<i>", j)``, independent of how the
    prompts are batched or resumed. ``'validation'``: the seeds a training run's validation at
    ``validation_step`` gave the same prompts (``trainer.data.PromptDataset.batch`` names the groups, the agent
    loop derives the seeds from ``actor_rollout_ref.rollout.seed``), so the scores of a checkpoint can be
    compared with the run's own ``val/`` figures."""

    num_inference_steps: int = 40
    guidance_scale: float = 4.5
    noise_level: float = 0.0
    height: int = 512
    width: int = 512
    images_per_prompt: int = 1
    negative_prompt: Optional[str] = None
    max_sequence_length: int = 128
    seed: int = 42
    seed_scheme: str = "eval"
    validation_step: Optional[int] = None  # seed_scheme=validation: the run's global step of that validation
    val_batch_size: Optional[int] = None  # seed_scheme=validation: the run's data.val_batch_size

    def __post_init__(self) -> None:
        if self.seed_scheme not in SEED_SCHEMES:
            raise ValueError(f"--seed-scheme={self.seed_scheme!r} is not one of {list(SEED_SCHEMES)}")
        if self.seed_scheme == "validation" and (self.validation_step is None or not self.val_batch_size):
            raise ValueError("--seed-scheme=validation needs --validation-step and --val-batch-size (the run's)")
        if isinstance(self.images_per_prompt, bool) or not isinstance(self.images_per_prompt, int):
            raise ValueError(f"--images-per-prompt must be an int, got {self.images_per_prompt!r}")
        if self.images_per_prompt < 1:
            raise ValueError(f"--images-per-prompt={self.images_per_prompt} must be >= 1")
        self.sampling_params().validate()

    def sampling_params(self) -> DiffusionSamplingParams:
        """One generate call's params: every step deterministic when noise_level is 0, no trajectory kept."""
        return DiffusionSamplingParams(
            num_inference_steps=self.num_inference_steps,
            height=self.height,
            width=self.width,
            guidance_scale=float(self.guidance_scale),
            negative_prompt=self.negative_prompt,
            max_sequence_length=self.max_sequence_length,
            noise_level=float(self.noise_level),
            sde_window_size=0,
            return_trajectory=False,
        )

    def seeds(self, prompt_index: int) -> list[int]:
        """The seeds of the images of prompt ``prompt_index`` (its row in the prompt file)."""
        n = self.images_per_prompt
        if self.seed_scheme == "eval":
            return [derive_seed(self.seed, f"eval/{prompt_index}", j) for j in range(n)]
        step, size = self.validation_step, self.val_batch_size
        first = prompt_index - prompt_index % size  # validation asks for val_batch_size prompts per rollout call
        uid = f"val{step}-{first}-{prompt_index - first}-{prompt_index}"  # PromptDataset.batch(tag=f"val{step}-..")
        return [derive_seed(self.seed, f"{step}/{uid}", j) for j in range(n)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> EvalProtocol:
        return dataclasses.replace(self, **changes)


# flow_grpo (yifan123/flow_grpo, config/grpo.py, general_ocr_sd3 / geneval_sd3): sample.eval_num_steps=40,
# sample.guidance_scale=4.5, resolution=512; its evaluation samples without SDE noise. GenEval: 4 images a prompt.
FLOWGRPO_OCR = EvalProtocol(num_inference_steps=40, guidance_scale=4.5, noise_level=0.0, height=512, width=512)
GENEVAL = FLOWGRPO_OCR.replace(images_per_prompt=4)

PRESETS: dict[str, dict[str, Any]] = {
    "flowgrpo_ocr": {"protocol": FLOWGRPO_OCR, "rewards": [{"name": "ocr", "weight": 1.0}], "ocr_metrics": True},
    # the GenEval scorer runs as a service of the user's own: --reward-url names it
    "geneval": {"protocol": GENEVAL, "rewards": [{"name": "http", "weight": 1.0}], "ocr_metrics": False},
}
