"""Multistep DPM-Solver++ ODE steps for flow matching (the higher-order solver of MixGRPO-Flash).

Pure functions of their arguments, in the conventions of ``flow_match_sde``: ``x_sigma = (1 - sigma) * x0 +
sigma * noise``, the model predicts the velocity ``v = noise - x0``, sigmas decrease to the terminal 0.
In DPM-Solver's terms ``alpha_t = 1 - sigma``, ``sigma_t = sigma`` and ``lambda = log(alpha_t / sigma_t)``; the
solver works on the data predictions ``x0 = x - sigma * v`` of the current and the previous steps.

Follows Tencent-Hunyuan/MixGRPO, fastvideo/utils/sampling_utils.py (``dpm_step`` with ``sde_solver=False``,
``convert_model_output``, ``dpm_solver_first_order_update``, ``multistep_dpm_solver_second_order_update``,
``multistep_dpm_solver_third_order_update``, commit e5cdd6a), itself diffusers' ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``) with the flow-matching alpha/sigma: the same order choice per step and the same
formulas, deterministic (no SDE variant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The ODE solvers a sampler may use outside the SDE window: Euler steps, or multistep DPM-Solver++ on a compressed
# schedule after the window (``DiffusionSamplingParams.ode_solver``).
ODE_SOLVERS = ("euler", "dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
MAX_ORDER = 3


def x0_from_velocity(velocity: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
    """The data prediction ``x0 = x - sigma * v`` the solver keeps per step (MixGRPO's ``convert_model_output``)."""
    return sample - sigma * velocity


def solver_order_at(step_index: int, num_steps: int, order: int, num_previous: int) -> int:
    """The order of step ``step_index`` of ``num_steps``: ``order`` once ``num_previous`` earlier data predictions
    exist, lower at the start, first order on the last step and at most second on the one before it when the
    schedule has fewer than 15 steps (for stability with few steps, as diffusers' ``lower_order_final``)."""
    if order not in (1, 2, 3):
        raise ValueError(f"order={order} must be 1, 2 or 3")
    if order == 1 or num_previous < 1 or step_index == num_steps - 1:
        return 1
    if order == 2 or num_previous < 2 or (step_index == num_steps - 2 and num_steps < 15):
        return 2
    return 3


def tail_points(num_steps: int, window_end: int, compress_ratio: float) -> int:
    """Points of MixGRPO-Flash's compressed ODE schedule after an SDE window ending at ``window_end`` (exclusive):
    ``int(max((T - last_window_step) * ratio, 1))`` as the original's ``run_sample_step``, at least 2 (the
    original's single point leaves the image at the window's last sigma, with no ODE step to sigma 0)."""
    if not 0 < compress_ratio <= 1:
        raise ValueError(f"compress_ratio={compress_ratio} must be in (0, 1]")
    if not 1 <= window_end <= num_steps - 1:
        raise ValueError(f"window_end={window_end} must be in [1, num_inference_steps - 1 = {num_steps - 1}]")
    last_window_step = window_end - 1
    return max(int(max((num_steps - last_window_step) * compress_ratio, 1)), 2)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR ``log(alpha_t) - log(sigma_t)``; +inf at sigma 0 and -inf at sigma 1 (the formulas stay finite)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def dpm_solver_step(
    x0_preds: Sequence[torch.Tensor],
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    step_index: int,
    order: int,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """One deterministic DPM-Solver++ step ``sigmas[step_index] -> sigmas[step_index + 1]`` of order ``order``.

    ``x0_preds``: the data predictions of the steps so far, the current step's last (``order`` of them are read);
    ``sigmas``: the float32 schedule the steps walk, ``sigmas[step_index - order + 1 .. step_index + 1]`` read.
    Returns the new sample in float32.
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type={solver_type!r} is not one of {SOLVER_TYPES}")
    if order not in (1, 2, 3):
        raise ValueError(f"order={order} must be 1, 2 or 3")
    if len(x0_preds) < order or step_index < order - 1:
        raise ValueError(f"an order-{order} step needs {order} data predictions, got {len(x0_preds)}")
    sample = sample.to(torch.float32)
    sigma_t, sigma_s0 = sigmas[step_index + 1], sigmas[step_index]
    alpha_t = 1 - sigma_t
    h = _lambda(sigma_t) - _lambda(sigma_s0)
    m0 = x0_preds[-1].to(torch.float32)
    if order == 1:
        return (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0

    m1 = x0_preds[-2].to(torch.float32)
    h_0 = _lambda(sigma_s0) - _lambda(sigmas[step_index - 1])
    r0 = h_0 / h
    if order == 2:
        d1 = (1.0 / r0) * (m0 - m1)
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * m0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * m0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        )

    m2 = x0_preds[-3].to(torch.float32)
    h_1 = _lambda(sigmas[step_index - 1]) - _lambda(sigmas[step_index - 2])
    r1 = h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return (
        (sigma_t / sigma_s0) * sample
        - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
    )


__all__ = [
    "MAX_ORDER",
    "ODE_SOLVERS",
    "SOLVER_TYPES",
    "dpm_solver_step",
    "solver_order_at",
    "tail_points",
    "x0_from_velocity",
]
