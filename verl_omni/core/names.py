"""Names that configs refer to, in one place (the registries that serve them assert they match)."""

# actor_rollout_ref.rollout.name: the engines behind the seam (verl_omni.rollout.engines).
ENGINE_NAMES = ("vllm_omni", "diffusers")
# actor_rollout_ref.model.pipeline: the RL pipelines (verl_omni.pipelines).
PIPELINE_NAMES = ("qwen_image", "sd3", "flux")
# The agent loop registered in verl's agent-loop registry (verl_omni.agent_loop).
AGENT_LOOP_NAME = "diffusion_single_turn"
