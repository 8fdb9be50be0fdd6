"""Quiet console output where the messages say nothing to act on (CPU runs, logs written to files)."""

from __future__ import annotations

import logging
import sys


def quiet_accelerator_warnings_on_cpu() -> None:
    """verl 0.9.1 warns once per process that it found no accelerator (``verl/plugin/platform/platform_manager.py``),
    which is the expected state of a CPU run. Raise that one logger's level when there is no GPU. Its module sets the
    level on import, so it is imported first."""
    import torch

    if torch.cuda.is_available():
        return
    import verl.plugin.platform.platform_manager as platform_manager

    logging.getLogger(platform_manager.__name__).setLevel(logging.ERROR)


def output_is_a_terminal() -> bool:
    """Progress bars only for a person watching: redirected to a file they garble it with carriage returns."""
    return sys.stderr.isatty()


def quiet_loading_bars() -> None:
    """diffusers' "Loading pipeline components" bars, when nobody watches (transformers' follow
    ``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    if not output_is_a_terminal():
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
