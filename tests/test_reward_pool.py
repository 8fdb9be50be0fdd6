"""RewardPool: groups scored one by one on Ray workers equal post-hoc scoring; failures name the samples."""

import asyncio

import numpy as np
import pytest
import ray
from PIL import Image, ImageDraw, ImageFont

from verl_omni.rewards import RewardComputationError, RewardManager
from verl_omni.rewards.pool import (
    RewardPool,
    RewardWorkerDiedError,
    default_num_reward_workers,
    resolve_num_reward_workers,
    split_bounds,
)

GUARDED_REWARD = '''
import os

def guarded(images, prompts, metadata):
    """len(prompt) / 100, but raises on "four" and kills its process on "die"."""
    if any("die" in p for p in prompts):
        os._exit(1)
    for p in prompts:
        if "four" in p:
            raise ValueError("four is not allowed")
    return [len(p) / 100 for p in prompts]
'''


def render_text(text: str, size=(256, 96)) -> np.ndarray:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, 20), text, fill="black", font=ImageFont.load_default(size=40))
    return np.asarray(image)


def batch_of_six():
    rng = np.random.default_rng(0)
    images = [
        render_text("Open Cafe"),
        render_text("Tiger"),
        np.full((96, 256, 3), 255, np.uint8),
        np.full((96, 256, 3), 30, np.uint8),
        rng.integers(0, 256, (96, 256, 3), dtype=np.uint8),
        rng.integers(0, 256, (96, 256, 3), dtype=np.uint8),
    ]
    prompts = [
        'a sign that says "Open Cafe"',
        'a poster titled "Tiger"',
        'a page that says "Blank"',
        'a night sky with "Stars"',
        'noise that says "Static"',
        'more noise with "Snow"',
    ]
    metadata = [
        {"reward_model": {"ground_truth": None}, "data_source": "ocr", "extra_info": {"index": i}} for i in range(6)
    ]
    return images, prompts, metadata


@pytest.fixture(scope="module")
def reward_config(tmp_path_factory):
    from verl_omni.models.tiny import build_tiny_clip

    folder = tmp_path_factory.mktemp("pool")
    (folder / "guarded.py").write_text(GUARDED_REWARD)
    return {
        "rewards": [
            {"name": "brightness", "weight": 1.0},
            {"name": "jpeg", "weight": 0.5},
            {"name": "ocr", "weight": 2.0},
            {"name": "pickscore", "path": build_tiny_clip(folder / "clip"), "weight": 0.1, "num_gpus": 0},
        ],
        "custom_reward_function": {"path": str(folder / "guarded.py"), "name": "guarded", "weight": 1.0},
        "num_workers": 2,  # a placement key: RewardManager ignores it
    }


@pytest.fixture(scope="module")
def pool(ray_session, reward_config):
    # model_actor_options reach the model actor's .options() (a placement-group strategy in the trainer)
    pool = RewardPool(reward_config, num_workers=2, model_actor_options={"name": "test-pool-pickscore"})
    yield pool
    pool.shutdown()


def assert_same_scores(streamed, post_hoc):
    assert list(streamed.per_reward) == list(post_hoc.per_reward)
    for name in ("brightness", "jpeg", "ocr", "custom/guarded"):  # CPU rewards: bit-identical
        np.testing.assert_array_equal(streamed.per_reward[name], post_hoc.per_reward[name], err_msg=name)
    # the model ran in another process (other thread count): float32 kernels may round differently
    np.testing.assert_allclose(streamed.per_reward["pickscore"], post_hoc.per_reward["pickscore"], rtol=1e-5)
    np.testing.assert_allclose(streamed.total, post_hoc.total, rtol=1e-6)


def test_scoring_groups_one_by_one_on_the_pool_equals_post_hoc_scoring(pool, reward_config):
    images, prompts, metadata = batch_of_six()
    post_hoc = RewardManager(reward_config)(images, prompts, metadata)
    assert post_hoc.per_reward["ocr"][0] >= 0.9 and post_hoc.per_reward["ocr"][2] == 0.0  # OCR really ran

    futures = [
        pool.submit(images[s : s + 2], prompts[s : s + 2], metadata[s : s + 2], sample_ids=[s, s + 1])
        for s in range(0, 6, 2)
    ]
    # each group of 2 is split over the 2 workers, so a rollout's last group does not wait on one worker
    assert [f.worker_indices for f in futures] == [[0, 1]] * 3
    streamed = RewardPool.gather(futures)
    assert_same_scores(streamed, post_hoc)
    assert set(streamed.seconds) == set(post_hoc.per_reward) and all(s > 0 for s in streamed.seconds.values())

    async def await_all():  # how an agent-loop worker (an asyncio actor) waits for its groups
        return [await pool.submit(images[s : s + 3], prompts[s : s + 3], metadata[s : s + 3]) for s in (0, 3)]

    assert_same_scores(type(streamed).concat(asyncio.run(await_all())), post_hoc)


def test_a_raising_reward_in_a_worker_names_the_reward_the_sample_and_its_prompt(pool):
    images, _, _ = batch_of_six()
    prompts = ['one "a"', 'two "b"', 'the "four" of us']
    with pytest.raises(RewardComputationError) as err:
        pool.submit(images[:3], prompts, None, sample_ids=[40, 41, 42]).result()
    message = str(err.value)
    assert "custom/guarded" in message and "sample 42" in message and 'the "four" of us' in message
    assert "ValueError: four is not allowed" in message


@pytest.mark.slow  # the worker is restarted twice (each start imports verl: ~15 s on 2 cores)
def test_a_dying_worker_names_its_samples_and_the_pool_goes_on(pool, reward_config):
    images, prompts, metadata = batch_of_six()
    doomed = pool.submit(images[:3], ['fine "a"', 'fine "b"', 'we "die" here'], None, sample_ids=[7, 8, 9])
    with pytest.raises(RewardWorkerDiedError) as err:
        doomed.result(timeout=300)  # it dies, is retried once on the restarted worker, dies again
    message = str(err.value)
    assert "samples [9]" in message and "'we \"die\" here'" in message  # the piece (of 2 + 1) that held "die"
    assert f"reward worker {doomed.worker_indices[1]} died" in message
    # Ray restarts the worker: both workers score the next groups, and the scores are still the post-hoc ones
    streamed = pool.score_groups(images, prompts, metadata, group_size=1)
    assert_same_scores(streamed, RewardManager(reward_config)(images, prompts, metadata))


def test_offloaded_reward_models_refuse_to_score_until_onloaded(pool, ray_session):
    images, prompts, metadata = batch_of_six()
    assert ray_session.get(ray_session.get_actor("test-pool-pickscore").ready.remote())["name"] == "pickscore"
    pool.offload_models()
    try:
        with pytest.raises(RewardComputationError, match=r"'pickscore'.*offloaded.*onload"):
            pool.submit(images[:1], prompts[:1], metadata[:1]).result()
    finally:
        pool.onload_models()
    assert np.isfinite(pool.submit(images[:1], prompts[:1], metadata[:1]).result().total).all()


def test_a_pool_larger_than_the_cluster_is_refused_before_anything_starts(ray_session, pool, reward_config):
    with pytest.raises(ValueError, match=r"reward.num_workers=64 x 1 CPU exceeds the Ray cluster"):
        RewardPool({"rewards": [{"name": "brightness"}]}, num_workers=64)
    # The module's pool holds 3 of the session's 4 CPUs: a second pool of 1 worker + 1 model actor would wait forever
    pickscore = next(e for e in reward_config["rewards"] if e["name"] == "pickscore")
    with pytest.raises(ValueError, match=r"needs 2 CPUs \(reward.num_workers=1 x 1 \+ 1 for 1 reward model actor"):
        RewardPool({"rewards": [pickscore]}, num_workers=1)
    with pytest.raises(ValueError, match=r"unknown reward 'brightnes'"):  # the config is checked in the driver
        RewardPool({"rewards": [{"name": "brightnes"}]}, num_workers=1)


def test_groups_are_split_into_near_equal_consecutive_pieces():
    assert split_bounds(16, 6) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 14), (14, 16)]
    assert split_bounds(3, 16) == [(0, 1), (1, 2), (2, 3)]  # never an empty piece
    assert split_bounds(16, 1) == [(0, 16)]  # split_groups=False
    assert split_bounds(0, 4) == [(0, 0)]


def test_the_default_worker_count_is_the_cores_left_by_replicas_agent_workers_and_the_driver():
    assert default_num_reward_workers(16, num_replicas=1, agent_loop_workers=2) == 12
    assert default_num_reward_workers(16, num_replicas=2, agent_loop_workers=1, cores_per_replica=3) == 8
    assert default_num_reward_workers(2, num_replicas=1, agent_loop_workers=1) == 1  # never below one
    assert resolve_num_reward_workers(None, cpu_cores=16, num_replicas=1, agent_loop_workers=2) == 12
    assert resolve_num_reward_workers("auto", cpu_cores=8, num_replicas=1, agent_loop_workers=1) == 5
    assert resolve_num_reward_workers(3, cpu_cores=8, num_replicas=1, agent_loop_workers=1) == 3
    with pytest.raises(ValueError, match=r"reward.num_workers=0 must be an int >= 1, or null / 'auto'"):
        resolve_num_reward_workers(0, cpu_cores=8, num_replicas=1, agent_loop_workers=1)


def test_a_model_only_config_sends_whole_groups_and_a_mixed_one_splits_them(ray_session, pool, reward_config):
    """Workers of a model-only config only forward to the model actor: one-image pieces would become one-image
    GPU calls. With a reward that runs in the workers, groups are split so that every worker shares the work."""
    images, prompts, metadata = batch_of_six()
    pickscore = dict(next(e for e in reward_config["rewards"] if e["name"] == "pickscore"), weight=1.0)
    # 0 CPUs asked: the module's pool already holds 3 of the session's 4
    light = {"num_cpus_per_worker": 0, "model_actor_options": {"num_cpus": 0}}
    assert pool.split_groups  # the module's pool: OCR and friends run in the workers
    model_only = RewardPool({"rewards": [pickscore]}, num_workers=2, **light)
    try:
        assert not model_only.split_groups
        whole = model_only.submit(images, prompts, metadata)
        assert len(whole.pieces) == 1 and len(whole.result().total) == 6
        (actor,) = model_only.model_actors.values()
        assert ray.get(actor.call_sizes.remote()) == [6]  # the group, in one model call
    finally:
        model_only.shutdown()
    forced = RewardPool({"rewards": [pickscore]}, num_workers=2, split_groups=True, **light)
    try:  # an explicit choice wins over the default
        split = forced.submit(images, prompts, metadata)
        assert forced.split_groups and [len(p.sample_ids) for p in split.pieces] == [3, 3]
        assert len(split.result().total) == 6
    finally:
        forced.shutdown()


COLOCATION_SCRIPT = """
import json
import sys
import numpy as np
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from verl_omni.models.tiny import build_tiny_clip
from verl_omni.rewards.model_actor import COLOCATED_GPU_SHARE
from verl_omni.rewards.pool import RewardPool

ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)  # 2 GPUs as Ray sees them
clip = build_tiny_clip(sys.argv[1])
pg = placement_group([{"GPU": 1}] * 2, strategy="PACK")
ray.get(pg.ready())


@ray.remote
class Replica:  # holds its bundle's GPU as a rollout replica does
    def gpu_ids(self):
        return ray.get_gpu_ids()


replicas = [
    Replica.options(num_cpus=0, num_gpus=1 - COLOCATED_GPU_SHARE,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k)).remote()
    for k in range(2)
]
replica_gpus = ray.get([r.gpu_ids.remote() for r in replicas])
entries = [{"name": "pickscore", "path": clip}, {"name": "clipscore", "path": clip}]
pool = RewardPool({"rewards": entries}, num_workers=1, colocate_models_with=pg)
model_gpus = [ray.get(a.ready.remote())["gpu_ids"] for a in pool.model_actors.values()]
images = [np.full((64, 64, 3), 40 * k, np.uint8) for k in range(3)]
scores = pool.submit(images, ["a cat", "a dog", "a car"]).result().total
pool.shutdown()
cpus_before = ray.available_resources().get("CPU", 0)
try:  # the first model starts (on CPU), the second cannot: the first must not be left running
    RewardPool({"rewards": [{"name": "clipscore", "path": clip, "num_gpus": 0},
                            {"name": "pickscore", "path": clip, "num_gpus": 1}]}, num_workers=1)
    error = None
except ValueError as exc:
    error = str(exc)
from verl_omni.rewards.model_actor import free_resource
cpus_after = free_resource("CPU", cpus_before)
print("RESULT", json.dumps([replica_gpus, model_gpus, len(scores), bool(np.isfinite(scores).all()), error,
                            cpus_before, cpus_after]))
"""


def test_reward_models_sit_on_the_replicas_gpus_and_a_model_wanting_a_gpu_of_its_own_is_refused(tmp_path):
    """Hybrid engine: the replicas' placement group holds every GPU. A model reward without num_gpus sits in replica
    k's bundle (entry k), on the same card; one asking for a whole GPU is refused with the reason instead of
    waiting forever for a GPU Ray will never free, and what had started is stopped. Ray is told of 2 GPUs (none
    needed: the models run on CPU)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", COLOCATION_SCRIPT, str(tmp_path / "clip")], capture_output=True, text=True, timeout=300
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-4000:]
    replica_gpus, model_gpus, count, finite, error, cpus_before, cpus_after = json.loads(line[len("RESULT ") :])
    assert sorted(replica_gpus) == [[0], [1]]
    assert model_gpus == replica_gpus  # entry k on replica k's card
    assert count == 3 and finite
    assert "num_gpus=1 but the Ray cluster has 0 GPU(s) free" in error and "trainer.n_gpus_per_node" in error
    assert cpus_after == cpus_before  # the model actor that had started was stopped
