"""Quiet console output where the messages say nothing to act on (logs written to files). verl's warning on a
CPU-only machine: ``core/workarounds.py``."""

from __future__ import annotations

import sys


def output_is_a_terminal() -> bool:
    """Progress bars only for a person watching: redirected to a file they garble it with carriage returns."""
    return sys.stderr.isatty()


def quiet_loading_bars() -> None:
    """diffusers' "Loading pipeline components" bars, when nobody watches (transformers' follow
    ``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    if not output_is_a_terminal():
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
