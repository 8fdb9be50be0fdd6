"""The batching rule: which groups of rollout.n rows become one B=N call, and why the others do not."""

import numpy as np
import pytest

from verl_omni.agent_loop.grouping import derive_seed, plan_groups
from verl_omni.core.prompts import prompt_text


def _rows(prompts, n, uid=True, **columns):
    raw = np.empty(len(prompts) * n, dtype=object)
    for i, p in enumerate(np.repeat(np.array(prompts, dtype=object), n)):
        raw[i] = p
    out = {"raw_prompt": raw, "agent_name": np.array(["diffusion_single_turn"] * len(raw), dtype=object)}
    if uid:
        out["uid"] = np.array([f"u{i}" for i in np.repeat(np.arange(len(prompts)), n)], dtype=object)
    out.update(columns)
    return out


def test_uniform_groups_are_batched():
    rows = _rows(["a", "b", "c"], 4)
    groups = plan_groups(rows, 12, 4, enabled=True)
    assert [g.rows for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(g.batched and g.reason is None for g in groups)


def test_mixed_prompt_in_one_group_falls_back_only_there():
    rows = _rows(["a", "b"], 3)
    rows["raw_prompt"][4] = "something else"
    groups = plan_groups(rows, 6, 3, enabled=True)
    assert [g.batched for g in groups] == [True, False]
    assert groups[1].reason == "mixed_raw_prompt"


def test_the_flag_gates_every_group():
    rows = _rows(["a", "b"], 2)
    assert [g.reason for g in plan_groups(rows, 4, 2, enabled=False)] == ["disabled", "disabled"]
    assert [g.batched for g in plan_groups(rows, 4, 2, enabled=False)] == [False, False]
    assert [g.batched for g in plan_groups(rows, 4, 2, enabled=True)] == [True, True]


def test_n_equal_one_and_length_not_multiple():
    assert {g.reason for g in plan_groups(_rows(["a", "b"], 1), 2, 1, enabled=True)} == {"n_is_1"}
    rows = _rows(["a", "b"], 2)
    rows = {k: v[:3] for k, v in rows.items()}
    groups = plan_groups(rows, 3, 2, enabled=True)
    assert {g.reason for g in groups} == {"length_not_multiple_of_n"}
    assert sorted(i for g in groups for i in g.rows) == [0, 1, 2]


def test_different_agent_names_fall_back():
    rows = _rows(["a"], 2)
    rows["agent_name"][1] = "other_loop"
    (group,) = plan_groups(rows, 2, 2, enabled=True)
    assert not group.batched and group.reason == "mixed_agent_name"


def test_groups_by_position_without_uid():
    groups = plan_groups(_rows(["a", "b"], 2, uid=False), 4, 2, enabled=True)
    assert [g.rows for g in groups] == [[0, 1], [2, 3]] and all(g.batched for g in groups)


def test_seed_derivation_is_stable_and_distinct():
    seeds = [derive_seed(42, "u0", k) for k in range(4)]
    assert seeds == [derive_seed(42, "u0", k) for k in range(4)]
    assert len(set(seeds)) == 4
    assert derive_seed(42, "u1", 0) != seeds[0] and derive_seed(43, "u0", 0) != seeds[0]


def test_prompt_text_from_chat_messages():
    assert prompt_text([{"role": "user", "content": 'a sign that says "hi"'}]) == 'a sign that says "hi"'
    assert prompt_text("plain") == "plain"
    with pytest.raises(ValueError, match="raw_prompt"):
        prompt_text([{"role": "assistant", "content": "x"}])
