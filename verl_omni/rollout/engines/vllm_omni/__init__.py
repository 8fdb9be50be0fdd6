"""The vllm-omni engine: THE ONLY package of verl_omni that imports ``vllm_omni`` (always lazily, inside functions).

Three modules, by the process they run in:

- ``engine.py`` — the server-actor side: :class:`~.engine.VllmOmniEngine` drives ``AsyncOmni``.
- ``worker.py`` — runs inside vllm-omni's diffusion worker process: :class:`~.worker.VllmOmniRLPipeline` (our RL
  pipeline as a vllm-omni custom pipeline) and :class:`~.worker.VllmOmniRLWorkerExtension` (``collective_rpc``
  targets: LoRA, memory, batching stats).
- ``wire.py`` — what crosses between them: our request in ``OmniDiffusionSamplingParams.extra_args`` and our
  output in ``DiffusionOutput.custom_output``.

How our RL pipeline runs inside vllm-omni 0.24.0 (read from its source, ``vllm_omni/diffusion``):

- ``AsyncOmni(model=<pipeline dir>, custom_pipeline_args={"pipeline_class": "<qualified name>", ...})`` makes the
  diffusion worker build ``load_format="custom_pipeline"``: it resolves the class by qualified name and constructs
  it as ``cls(od_config=...)`` on CPU, calls ``load_weights(iterator)``, then ``.to(device)`` inside the CuMem
  "weights" pool (so ``sleep(level=1)`` can offload it). The model runner calls ``forward(DiffusionRequestBatch)``
  under ``torch.inference_mode()`` and expects one ``DiffusionOutput`` per request.
- Per-step tensors travel in ``DiffusionOutput.trajectory_latents / trajectory_timesteps / trajectory_log_probs``
  and everything else in ``custom_output`` (-> ``OmniRequestOutput._custom_output``).
- One request with ``num_outputs_per_prompt=len(seeds)`` is one batch-N ``rl_generate`` call; with engine-side
  request batching (``max_num_seqs > 1``) requests of the same prompt and params are merged into one call.
- LoRA: vllm-omni's own LoRA manager replaces vLLM ``LinearBase`` layers of its native transformers and loads
  adapters from disk; our pipeline is diffusers + peft. So the adapter is peft's (``verl_omni.models.lora``, as in
  the diffusers engine and the actor), and ``update_lora`` sets its tensors in the worker through ``collective_rpc``:
  in memory, no files.
- Attention: the joint attention calls the flash kernel vllm-omni resolves for its own diffusion models (FA3 from
  ``fa3-fwd`` on Hopper) when there is no text padding mask; ``DIFFUSION_ATTENTION_BACKEND=TORCH_SDPA`` (vllm-omni's
  own switch) keeps diffusers' SDPA. The diffusers engine keeps diffusers' stock modules: it is the baseline.
"""
