"""Ways a run stops before its last step on purpose, each with its own message and exit code.

- :class:`NoLearningSignalError`: steps whose advantages are all zero (every prompt group scored equal: a constant
  reward, every reward weight 0) train nothing; :class:`NoSignalWatch` warns on the first such step and stops the run
  after ``trainer.max_steps_without_signal`` of them in a row.
- :class:`TrainingInterrupted`: SIGTERM or SIGINT (Ctrl-C). :class:`GracefulStop` lets the loop finish the current
  step (a second signal abandons it at once); the trainer then shuts Ray down and releases the run lock, and the entry
  point exits 128 + the signal number (143 / 130), as a shell reports a process killed by that signal.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

logger = logging.getLogger(__name__)

# |advantage| at or below this counts as zero. FlowGRPO's advantage of an all-equal group is 0 up to the rounding of
# the group mean (~1e-17 / (std + 1e-6), i.e. ~1e-11); a group that differs at all gets |A| of order 1.
NO_SIGNAL_TOLERANCE = 1e-6
NO_SIGNAL_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NoLearningSignalError(RuntimeError):
    """Too many steps in a row whose advantages were all zero; the entry point exits ``exit_code``."""

    exit_code = NO_SIGNAL_EXIT_CODE


class TrainingInterrupted(BaseException):
    """SIGTERM / SIGINT stopped the run (a BaseException, as KeyboardInterrupt: no ``except Exception`` swallows it
    while a step is abandoned); the entry point exits ``exit_code`` = 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class NoSignalWatch:
    """Counts steps in a row whose advantages are all zero; warns on each, raises NoLearningSignalError at the limit
    (``max_steps`` 0: warn only)."""

    def __init__(self, max_steps: int, tolerance: float = NO_SIGNAL_TOLERANCE):
        self.max_steps, self.tolerance = max_steps, tolerance
        self.in_a_row = 0

    def observe(self, step: int, advantages_abs_max: float) -> None:
        if advantages_abs_max > self.tolerance:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        cause = (
            f"every advantage is 0 (max |A| = {advantages_abs_max:.3g} <= {self.tolerance:g}): each prompt's "
            "images got equal rewards (a constant reward, or every reward weight 0), so the policy gradient is 0"
        )
        if self.max_steps and self.in_a_row >= self.max_steps:
            raise NoLearningSignalError(
                f"no learning signal in {self.in_a_row} steps in a row (the limit is "
                f"trainer.max_steps_without_signal={self.max_steps}; last: step {step}): {cause}. Check the reward "
                "(reward.rewards, its weights, custom_reward_function) on a few images; "
                "trainer.max_steps_without_signal=0 never stops"
            )
        left = ""
        if self.max_steps:
            left = f"; the run stops after {self.max_steps - self.in_a_row} more such step(s) in a row"
        message = (
            f"step {step} carried no learning signal ({self.in_a_row} in a row): {cause}{left} "
            f"(trainer.max_steps_without_signal={self.max_steps})"
        )
        logger.warning(message)
        print(f"[verl_omni] WARNING {message}", flush=True)


class GracefulStop:
    """SIGTERM / SIGINT handlers for the trainer's process (installed from the main thread only).

    While ``finish_step`` is set (the training loop), the first signal is recorded and the loop stops after the
    current step (:meth:`raise_if_requested`); otherwise, and on a second signal, the handler raises
    TrainingInterrupted at once, abandoning what runs (nothing half-written survives: checkpoints are atomic).
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self.finish_step = False
        self._previous: dict[int, object] = {}

    def install(self) -> GracefulStop:
        """(Re)install the handlers: ``ray.init`` replaces SIGTERM's with its own, so call again after it."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)
        return self

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = signum
        name = signal_name(signum)
        if first and self.finish_step:
            # os.write, not print: a handler may interrupt a print to the same stream (reentrant call)
            os.write(
                2,
                f"[verl_omni] {name} received: finishing the current step, then stopping "
                f"(send {name} again to stop at once)\n".encode(),
            )
            return
        what = "; the step in progress was abandoned" if self.finish_step else " during start-up"
        raise TrainingInterrupted(signum, f"stopped by {name}{what}")

    def raise_if_requested(self, step: int, total: int, checkpoint: Optional[str]) -> None:
        """Between steps: stop here if a signal came."""
        if self.signum is None:
            return
        if checkpoint:
            resume = f"latest checkpoint: {checkpoint}. The same command resumes the run (trainer.resume_mode=auto)"
        else:
            resume = "checkpoints are off (trainer.save_freq=-1): there is nothing to resume from"
        raise TrainingInterrupted(
            self.signum, f"stopped by {signal_name(self.signum)} after step {step} of {total}; {resume}"
        )
