"""The agent-loop workers' rollout batches cross Ray as flat numpy bytes and come back as verl's DataProto."""

import numpy as np
import pytest
import torch
from verl import DataProto

from verl_omni.agent_loop.transport import pack, unpack_concat


def _batch(rows: int, seed: int) -> DataProto:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "latents": torch.randn(rows, 3, 5, 4, generator=g),
        "prompt_embeds": torch.randn(rows, 6, 8, generator=g).to(torch.bfloat16),
        "window_mask": torch.rand(rows, 4, generator=g) > 0.5,
        "latent_steps": torch.randint(0, 9, (rows, 3), generator=g),
        "empty": torch.zeros(rows, 0, 5),  # validation's trajectories: no latents kept
        "media": torch.randint(0, 255, (rows, 1, 2, 2, 3), generator=g, dtype=torch.uint8),
    }
    non_tensor = {
        "uid": np.array([f"u{seed}-{i}" for i in range(rows)], dtype=object),
        "reward_scores": np.array([{"ocr": float(i)} for i in range(rows)], dtype=object),
    }
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensor, meta_info={"reward_weights": {"ocr": 1.0}})


def test_packed_batches_cross_ray_and_concatenate_like_dataproto(ray_session):
    parts = [_batch(3, 0), _batch(2, 1)]
    # Through Ray's object store, as the workers' results travel (numpy arrays come back as read-only views).
    received = ray_session.get([ray_session.put(pack(p)) for p in parts])
    out = unpack_concat(received)
    ref = DataProto.concat(parts)
    assert len(out) == 5 and set(out.batch.keys()) == set(ref.batch.keys())
    for name in ref.batch.keys():
        assert out.batch[name].dtype == ref.batch[name].dtype, name
        assert torch.equal(out.batch[name], ref.batch[name]), name
    for name, values in ref.non_tensor_batch.items():
        assert list(out.non_tensor_batch[name]) == list(values), name
    assert out.meta_info == {"reward_weights": {"ocr": 1.0}}
    # The tensors own writable memory: an in-place edit neither fails nor reaches the senders' tensors.
    sent = parts[0].batch["latents"].clone()
    out.batch["latents"].add_(1.0)
    assert torch.equal(parts[0].batch["latents"], sent)
    assert not torch.equal(out.batch["latents"][:3], sent)


def test_one_packed_batch_unpacks_to_its_own_memory():
    part = _batch(4, 2)
    out = unpack_concat([pack(part)])
    out.batch["media"].zero_()
    assert part.batch["media"].any()  # the sender's tensor is untouched


def test_batches_that_disagree_are_refused_naming_the_tensor():
    a, b = _batch(2, 0), _batch(2, 1)
    b.batch["latents"] = torch.zeros(2, 4, 5, 4)  # another number of kept latents
    with pytest.raises(ValueError, match="latents"):
        unpack_concat([pack(a), pack(b)])
    with pytest.raises(ValueError, match="no rollout batches"):
        unpack_concat([])
