"""The FLUX.1-dev, SD3.5-Medium, Wan2.1-T2V-1.3B and Wan2.2-TI2V-5B GPU recipes: their presets compose into valid
configs that carry flow_grpo's settings for the family (flow_grpo config/grpo.py: pickscore_flux for FLUX,
general_ocr_sd3 for SD3.5-M, general_ocr_wan2_1 for Wan2.1; scripts/train_flux.py / train_sd3.py / train_wan2_1.py
for the LoRA, the prompt length and the EMA) or, for Wan2.2-TI2V-5B, verl-omni's Wan2.2 settings; SD3.5-Medium's full
fine-tuning recipe is its LoRA recipe training every weight, and their scripts load them."""

import os

import pytest
from helpers import compose_preset

from verl_omni.config.trainer import FlowGRPOConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
SD3_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
    "attn.to_q", "attn.to_v",
)  # fmt: skip


def _parsed(name: str, family: str):
    return FlowGRPOConfig.from_omega(compose_preset(name, [f"actor_rollout_ref.model.path=tiny:{family}"]))


def test_the_flux_recipe_is_flow_grpos_flux_training():
    cfg = _parsed("flux_flowgrpo_ocr_lora", "flux")
    ref = cfg.actor_rollout_ref
    model, actor, rollout = ref.model, ref.actor, ref.rollout
    assert model.pipeline == "flux" and (model.lora_rank, model.lora_alpha) == (64, 128)
    assert tuple(model.target_modules) == FLUX_TARGETS
    assert (rollout.pipeline.height, rollout.pipeline.width, rollout.pipeline.num_inference_steps) == (512, 512, 6)
    assert rollout.pipeline.true_cfg_scale == 1.0  # distilled guidance only (the pipeline's 3.5)
    assert rollout.val_kwargs.num_inference_steps == 28 and rollout.pipeline.max_sequence_length == 128
    assert rollout.n == 24 and rollout.algo.noise_level == 0.9
    # timestep_fraction 0.99 of 6 steps: flow_grpo trains steps 0..4
    assert (rollout.algo.sde_window_size, tuple(rollout.algo.sde_window_range)) == (5, (0, 0))
    assert (actor.optim.lr, actor.clip_ratio, actor.kl_coef, actor.adv_clip_max) == (3e-4, 1e-4, 0.0, 5.0)
    assert actor.ema.enable and (actor.ema.decay, actor.ema.update_interval) == (0.9, 8)
    assert cfg.algorithm.name == "flowgrpo" and rollout.name == "vllm_omni"
    assert [r["name"] for r in cfg.reward.rewards] == ["ocr"]
    # Inductor fails on FLUX's training graph: the update runs eager, the engine's rollouts compiled.
    assert actor.use_torch_compile is False and rollout.enforce_eager is False


def test_the_sd3_5_medium_recipe_is_flow_grpos_general_ocr_sd3():
    cfg = _parsed("sd3_5_medium_flowgrpo_ocr_lora", "sd3")
    ref = cfg.actor_rollout_ref
    model, actor, rollout = ref.model, ref.actor, ref.rollout
    assert model.pipeline == "sd3" and (model.lora_rank, model.lora_alpha) == (32, 64)
    assert tuple(model.target_modules) == SD3_TARGETS
    assert (rollout.pipeline.height, rollout.pipeline.width, rollout.pipeline.num_inference_steps) == (512, 512, 10)
    assert rollout.pipeline.true_cfg_scale == 4.5 and rollout.pipeline.negative_prompt == ""
    assert rollout.val_kwargs.num_inference_steps == 40 and rollout.pipeline.max_sequence_length == 128
    assert rollout.n == 24 and rollout.algo.noise_level == 0.7
    assert (rollout.algo.sde_window_size, tuple(rollout.algo.sde_window_range)) == (9, (0, 0))
    assert (actor.optim.lr, actor.clip_ratio, actor.kl_coef) == (3e-4, 1e-4, 0.04)
    assert actor.ema.enable and (actor.ema.decay, actor.ema.update_interval) == (0.9, 8)
    assert cfg.algorithm.name == "flowgrpo" and rollout.name == "vllm_omni"


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_sd3_5_medium_full_recipe_is_the_lora_recipe_training_every_weight():
    """configs/sd3_5_medium_flowgrpo_ocr_full.yaml: the LoRA recipe with lora_rank 0, lr 3e-5, no KL term (full
    fine-tuning keeps no reference policy), 8 images per VAE decode (the optimizer's shards sit beside the
    rollout's decode) and blocks' activations kept up to 88% of the card; the LoRA's own keys and the experiment
    name aside, nothing else differs."""
    from omegaconf import OmegaConf

    path = ["actor_rollout_ref.model.path=tiny:sd3"]
    full = _flat(OmegaConf.to_container(compose_preset("sd3_5_medium_flowgrpo_ocr_full", path)))
    lora = _flat(OmegaConf.to_container(compose_preset("sd3_5_medium_flowgrpo_ocr_lora", path)))
    differ = {k: (lora.get(k), full.get(k)) for k in set(full) | set(lora) if full.get(k) != lora.get(k)}
    m, a = "actor_rollout_ref.model.", "actor_rollout_ref.actor."
    assert differ == {
        f"{m}lora_rank": (32, 0),
        f"{m}gradient_checkpointing_memory_utilization": (0.92, 0.88),
        f"{m}lora_alpha": (64, differ[f"{m}lora_alpha"][1]),
        f"{m}target_modules": (list(SD3_TARGETS), differ[f"{m}target_modules"][1]),
        f"{a}optim.lr": (3e-4, 3e-5),
        f"{a}kl_coef": (0.04, 0.0),
        "actor_rollout_ref.rollout.pipeline.vae_decode_batch": (0, 8),
        "trainer.experiment_name": ("sd3_5_medium_ocr_lora", "sd3_5_medium_ocr_full"),
    }
    cfg = _parsed("sd3_5_medium_flowgrpo_ocr_full", "sd3")
    assert cfg.actor_rollout_ref.model.lora is None and not cfg.actor_rollout_ref.actor.optimizer_offload


def test_the_sd3_5_medium_full_recipe_passes_the_start_up_checks(tiny_sd3_dir, capsys):
    """The trainer's checks before Ray starts, on the tiny SD3 model: the config, the model and the full
    fine-tuning memory plan (printed; no GPU here to refuse it)."""
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    trainer = FlowGRPOTrainer(
        compose_preset("sd3_5_medium_flowgrpo_ocr_full", [f"actor_rollout_ref.model.path={tiny_sd3_dir}"])
    )
    trainer._check_model(tiny_sd3_dir)
    out = capsys.readouterr().out
    assert "full fine-tuning memory plan" in out and "actor_rollout_ref.actor.optimizer_offload=false" in out


def test_the_qwen_image_full_recipe_is_verl_omnis_full_weight_recipe():
    """configs/qwen_image_flowgrpo_ocr_full.yaml: verl-omni's full-weight FlowGRPO recipe for Qwen-Image
    (examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr.sh): 4 GPUs, 32 prompts x 16 images, no CFG, lr 3e-5,
    weight decay 1e-4, clip 1e-5, noise 1.2, a 2-step window starting in steps 0..4, 256-token prompts; every weight
    trained with the optimizer's shards in host memory and the text encoder off the GPU for each update."""
    cfg = _parsed("qwen_image_flowgrpo_ocr_full", "qwen_image")
    ref = cfg.actor_rollout_ref
    model, actor, rollout = ref.model, ref.actor, ref.rollout
    assert model.pipeline == "qwen_image" and model.lora is None and model.text_encoder_offload is True
    assert (cfg.trainer.n_gpus_per_node, cfg.data.train_batch_size, rollout.n) == (4, 32, 16)
    assert rollout.pipeline.true_cfg_scale == 1.0 and rollout.pipeline.max_sequence_length == 256
    assert (rollout.pipeline.height, rollout.pipeline.width, rollout.pipeline.num_inference_steps) == (512, 512, 10)
    assert rollout.algo.noise_level == 1.2
    assert (rollout.algo.sde_window_size, tuple(rollout.algo.sde_window_range)) == (2, (0, 5))
    assert (actor.optim.lr, actor.optim.weight_decay, actor.clip_ratio, actor.kl_coef) == (3e-5, 1e-4, 1e-5, 0.0)
    assert actor.optimizer_offload and not actor.ema.enable
    assert cfg.algorithm.name == "flowgrpo" and rollout.name == "vllm_omni"
    assert [r["name"] for r in cfg.reward.rewards] == ["ocr"]


def test_the_qwen_image_full_recipe_passes_the_start_up_checks(tiny_qwen_image_dir, capsys, monkeypatch):
    """The trainer's checks before Ray starts, on the tiny Qwen-Image, on a node of 4 GPUs with 512 GiB of host
    memory (this machine's own memory leaves less than the run's processes take on 4 GPUs, which the host check
    refuses): the plan is printed with the offload on, and the host memory's reckoning."""
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer
    from verl_omni.workers.full_weights import GiB, HostBudget

    node = HostBudget(512 * GiB, 500 * GiB, 4)
    monkeypatch.setattr(HostBudget, "of_this_node", classmethod(lambda cls, gpus, env=None: node))
    trainer = FlowGRPOTrainer(
        compose_preset("qwen_image_flowgrpo_ocr_full", [f"actor_rollout_ref.model.path={tiny_qwen_image_dir}"])
    )
    trainer._check_model(tiny_qwen_image_dir)
    out = capsys.readouterr().out
    assert "full fine-tuning memory plan" in out and "actor_rollout_ref.actor.optimizer_offload=true" in out
    assert "host memory per node" in out and "38.00 GiB for the run's processes" in out  # 14 GiB + 4 x 6 GiB


def test_the_wan2_1_recipe_is_flow_grpos_general_ocr_wan2_1():
    cfg = _parsed("wan2_1_t2v_1_3b_flowgrpo_lora", "wan")
    ref = cfg.actor_rollout_ref
    model, actor, rollout = ref.model, ref.actor, ref.rollout
    assert model.pipeline == "wan" and (model.lora_rank, model.lora_alpha) == (32, 64)
    assert tuple(model.target_modules) == ("to_q", "to_k", "to_v", "to_out.0")
    assert (model.wan.num_frames, model.wan.fps) == (33, 8.0)
    assert (rollout.pipeline.height, rollout.pipeline.width, rollout.pipeline.num_inference_steps) == (240, 416, 20)
    assert rollout.pipeline.true_cfg_scale == 4.5 and rollout.pipeline.negative_prompt == ""
    assert rollout.val_kwargs.num_inference_steps == 50 and rollout.pipeline.max_sequence_length == 512
    assert rollout.n == 4 and rollout.algo.noise_level == 0.7
    # timestep_fraction 0.99 of 20 steps: flow_grpo trains steps 0..18
    assert (rollout.algo.sde_window_size, tuple(rollout.algo.sde_window_range)) == (19, (0, 0))
    assert (actor.optim.lr, actor.clip_ratio, actor.kl_coef) == (1e-4, 1e-3, 0.004)
    assert actor.ema.enable and (actor.ema.decay, actor.ema.update_interval) == (0.9, 8)
    assert cfg.algorithm.name == "flowgrpo" and not cfg.algorithm.flowgrpo.global_std
    (ocr,) = cfg.reward.rewards
    assert (ocr["name"], ocr["frame_reduction"], ocr["frame_stride"]) == ("ocr", "mean", 4)  # flow_grpo's video_ocr


def test_the_wan2_2_ti2v_5b_recipe_carries_verl_omnis_wan2_2_settings():
    """verl-omni's Wan2.2 recipe (examples/dancegrpo_trainer/wan22/run_wan22_5b_t2v_hpsv3_*.sh): 704 x 1280, 10 steps
    (50 to validate), CFG 5.0, groups of 8, micro-batches of 4, a 2-step window starting in steps 0..3 (its range
    [0, 5]), its num_frames=8 as WanPipeline rounds it (9); the LoRA and the rest are Wan2.1's recipe's."""
    cfg = _parsed("wan2_2_ti2v_5b_flowgrpo_lora", "wan2_2_ti2v")
    wan2_1 = _parsed("wan2_1_t2v_1_3b_flowgrpo_lora", "wan")
    ref = cfg.actor_rollout_ref
    model, actor, rollout = ref.model, ref.actor, ref.rollout
    height, width = rollout.pipeline.height, rollout.pipeline.width
    assert (height, width) == (704, 1280) and height % 32 == 0 and width % 32 == 0  # the Wan2.2 VAE's 16x x patch 2
    assert model.wan.num_frames == 8 // 4 * 4 + 1
    assert (rollout.pipeline.num_inference_steps, rollout.val_kwargs.num_inference_steps) == (10, 50)
    assert rollout.pipeline.true_cfg_scale == 5.0 and rollout.n == 8 and actor.ppo_micro_batch_size_per_gpu == 4
    assert (rollout.algo.sde_window_size, tuple(rollout.algo.sde_window_range)) == (2, (0, 5 - 2))
    assert cfg.trainer.total_training_steps == 120 and cfg.trainer.save_freq == cfg.trainer.test_freq == 30
    # not knowable from verl-omni's full fine-tuning DanceGRPO script: Wan2.1's recipe's
    w_ref = wan2_1.actor_rollout_ref
    assert model.pipeline == "wan" and (model.lora_rank, model.lora_alpha) == (w_ref.model.lora_rank, 64)
    assert tuple(model.target_modules) == tuple(w_ref.model.target_modules)
    assert (actor.optim.lr, actor.clip_ratio, actor.kl_coef) == (
        w_ref.actor.optim.lr, w_ref.actor.clip_ratio, w_ref.actor.kl_coef,
    )  # fmt: skip
    assert rollout.algo.noise_level == w_ref.rollout.algo.noise_level and rollout.algo.sde_type == "sde"
    assert rollout.pipeline.max_sequence_length == 512 and rollout.pipeline.negative_prompt == ""
    assert cfg.reward.rewards == wan2_1.reward.rewards and actor.ema.enable


def test_the_wan2_2_ti2v_5b_recipe_passes_the_start_up_checks_on_the_tiny_ti2v(tiny_wan2_2_ti2v_dir):
    """The trainer's checks before Ray starts on the tiny TI2V-5B (the Wan2.2 VAE): the sides fit its 16x VAE and its
    scheduler takes the step counts; a side that is not a multiple of 32 is refused naming the key."""
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    path = [f"actor_rollout_ref.model.path={tiny_wan2_2_ti2v_dir}"]
    FlowGRPOTrainer(compose_preset("wan2_2_ti2v_5b_flowgrpo_lora", path))._check_model(tiny_wan2_2_ti2v_dir)
    odd = compose_preset("wan2_2_ti2v_5b_flowgrpo_lora", [*path, "actor_rollout_ref.rollout.pipeline.height=720"])
    with pytest.raises(ValueError, match=r"actor_rollout_ref.rollout.pipeline: .*multiples? of 32"):
        FlowGRPOTrainer(odd)._check_model(tiny_wan2_2_ti2v_dir)


@pytest.mark.parametrize(
    "script, preset, path_variable",
    [
        ("examples/flowgrpo_trainer/flux/run_flux_ocr_lora.sh", "flux_flowgrpo_ocr_lora", "FLUX_PATH"),
        ("examples/flowgrpo_trainer/sd3/run_sd3_5_medium_ocr_lora.sh", "sd3_5_medium_flowgrpo_ocr_lora", "SD3_PATH"),
        ("examples/flowgrpo_trainer/sd3/run_sd3_5_medium_ocr_full.sh", "sd3_5_medium_flowgrpo_ocr_full", "SD3_PATH"),
        (
            "examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_full.sh",
            "qwen_image_flowgrpo_ocr_full",
            "QWEN_IMAGE_PATH",
        ),
        ("examples/flowgrpo_trainer/wan/run_wan_t2v_lora.sh", "wan2_1_t2v_1_3b_flowgrpo_lora", "WAN_PATH"),
        ("examples/flowgrpo_trainer/wan/run_wan2_2_ti2v_lora.sh", "wan2_2_ti2v_5b_flowgrpo_lora", "WAN_PATH"),
    ],
)
def test_the_recipe_script_loads_its_preset_and_asks_for_the_model(script, preset, path_variable):
    path = os.path.join(REPO, script)
    text = open(path).read()
    assert os.access(path, os.X_OK)
    assert f"--config-name {preset}" in text and f'actor_rollout_ref.model.path="${path_variable}"' in text
    assert f"${{{path_variable}:?" in text  # a clear error when the model directory is not given
