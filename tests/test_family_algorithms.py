"""Every algorithm of the algorithm seam on FLUX.1-dev, SD3.5, Wan2.1 text-to-video, Wan2.2-TI2V-5B's text-to-video
and the two-expert Wan2.2-T2V-A14B (tiny random models; ``tiny:wan2_2_ti2v`` / ``tiny:wan2_2_t2v`` through the ``wan``
family): each samples the family its own way and trains the LoRA from that rollout (Qwen-Image:
tests/test_algorithms.py and the algorithms' tests)."""

import numpy as np
import pytest
import torch
from helpers import model_config, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams

# Each registered algorithm's settings for a short run (MixGRPO: MixGRPO-Flash's DPM-Solver++ tail).
ALGORITHM_SECTIONS = {
    "flowgrpo": {},
    "mixgrpo": {"window_size": 2, "ode_solver": "dpmsolver++"},
    "diffusion_nft": {"decay_type": 1},
}


# A family's own options for the short run (Wan: 5-frame clips)
FAMILY_OPTIONS = {"wan": {"wan": {"num_frames": 5}}}


@pytest.mark.parametrize("tiny", ["flux", "sd3", "wan", "wan2_2_ti2v", "wan2_2_t2v"])
@pytest.mark.parametrize("name", sorted(ALGORITHM_SECTIONS))
def test_every_registered_algorithm_trains_the_family(name, tiny, request):
    """Each algorithm behind the seam samples the family its way (FlowGRPO's SDE steps, MixGRPO's window with a
    DPM-Solver++ tail, DiffusionNFT's CFG-free ODE keeping x_0) and updates the LoRA from that rollout."""
    from verl_omni.algorithms.registry import registered_algorithms
    from verl_omni.pipelines.registry import tiny_model
    from verl_omni.workers.actor import DiffusionLoRAActor

    assert set(ALGORITHM_SECTIONS) == set(registered_algorithms())  # a new algorithm is tested here too
    family = tiny_model(tiny)[0].name
    actor = DiffusionLoRAActor(
        model_config(request.getfixturevalue(f"tiny_{tiny}_dir"), pipeline=family, **FAMILY_OPTIONS.get(family, {})),
        ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=4),
        rollout_config(),
        lora_seed=3,
        algorithm={"name": name, name: ALGORITHM_SECTIONS[name]},
    )
    algo = actor.algorithm
    base = DiffusionSamplingParams(num_inference_steps=5, height=32, width=32, trajectory_window_only=True)
    prompts, records = ["a red cat", "text 'OK'"], []
    for i, prompt in enumerate(prompts):
        params = algo.sampling(base, step=1, group_seed=i, validate=False).validate()
        records.append(actor.pipe.rl_generate(prompt, [3 + 2 * i, 4 + 2 * i], params))
    raw = np.empty(4, dtype=object)
    for i in range(4):
        raw[i] = [{"role": "user", "content": prompts[i // 2]}]
    uid = np.array([f"g{i // 2}" for i in range(4)], dtype=object)
    data = records_data_proto(records, {"raw_prompt": raw, "uid": uid})
    advantages, _ = algo.advantages(torch.tensor([0.2, 0.8, 0.6, 0.1], dtype=torch.float64), uid)
    before = actor.lora_state_dict()
    metrics = actor.update(data, advantages)
    assert metrics["actor/num_train_terms"] > 0 and np.isfinite(metrics["actor/grad_norm"])
    assert any(not torch.equal(before[k], v) for k, v in actor.lora_state_dict().items())
