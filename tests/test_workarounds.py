"""The workarounds for the pinned libraries live in one module (``verl_omni/core/workarounds.py``): each listed in
its docstring, each with its own condition for removal, and no removal note anywhere else in the package."""

import inspect
import pathlib
import re

from verl_omni.core import workarounds

PKG = pathlib.Path(__file__).resolve().parents[1] / "verl_omni"
REMOVAL_NOTE = re.compile(r"\b(remove|goes)\b[^.]{0,40}?\bwhen\b", re.IGNORECASE)  # "Remove [the x] when"


def _listed() -> list[str]:
    """The names the module's docstring lists as entries (``- :func:`name``` / ``- :class:`name```)."""
    return re.findall(r"^- :(?:func|class):`(\w+)`", workarounds.__doc__, flags=re.MULTILINE)


def test_every_listed_workaround_exists_and_says_when_it_can_go():
    listed = _listed()
    assert len(listed) >= 7, listed
    for name in listed:
        doc = inspect.getdoc(getattr(workarounds, name))
        assert doc and REMOVAL_NOTE.search(doc), f"{name}: its docstring names no condition for removing it"
    unlisted = [n for n in workarounds.__all__ if REMOVAL_NOTE.search(inspect.getdoc(getattr(workarounds, n)) or "")]
    assert sorted(unlisted) == sorted(listed), "a workaround in the module that its docstring does not list"


def test_no_removal_note_outside_the_workarounds_module():
    """A workaround elsewhere (code with a "remove when" note) belongs in core/workarounds.py."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "core" / "workarounds.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if REMOVAL_NOTE.search(line):
                found.append(f"{path.relative_to(PKG.parent)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_dummy_run_sampling_serves_vllm_omnis_start_up_request_as_plain_ode_sampling():
    from types import SimpleNamespace

    from verl_omni.config.sampling import DiffusionSamplingParams

    dummy = SimpleNamespace(num_outputs_per_prompt=2, seed=7, num_inference_steps=1, height=512, width=256)
    seeds, fields = workarounds.dummy_run_sampling(dummy)
    params = DiffusionSamplingParams(**fields)
    assert seeds == [7, 8]
    assert (params.num_inference_steps, params.height, params.width) == (2, 512, 256)  # at least 2 steps
    assert params.noise_level == 0.0 and not params.return_trajectory
    bare = SimpleNamespace(num_outputs_per_prompt=None, seed=None, num_inference_steps=None, height=None, width=None)
    assert workarounds.dummy_run_sampling(bare) == ([0], {**fields, "height": 512, "width": 512})
