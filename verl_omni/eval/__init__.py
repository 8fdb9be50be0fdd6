"""Evaluation of a base pipeline or a trained adapter on a prompt file with a fixed protocol
(``python -m verl_omni.eval``): per-prompt and mean scores of any registered rewards, OCR accuracy and exact
match, image grids, in a resumable JSON report. See docs/evaluation.md."""

from verl_omni.eval.protocol import PRESETS, EvalProtocol
from verl_omni.eval.runner import EvalJob, run_evaluation

__all__ = ["PRESETS", "EvalJob", "EvalProtocol", "run_evaluation"]
