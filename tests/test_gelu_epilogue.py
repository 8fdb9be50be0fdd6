"""The FFN's tanh GELU swapped for the GEMM-epilogue module (models/gelu_epilogue.py) on the tiny models, on CPU:
the swap keeps parameters and state-dict keys, leaves exact-GELU modules alone, falls back to diffusers' formula
off CUDA (the epilogue op computes the exact GELU on CPU, so taking it there would change the result), and undoes.
The CUDA path (the epilogue itself, inside torch.compile) is tests/gpu/test_gelu_epilogue_gpu.py."""

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward

from verl_omni.models.gelu_epilogue import EpilogueGELU, use_gelu_epilogue, use_plain_gelu


def _forward(transformer, seed=0):
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 5
    hidden = torch.randn(2, tokens, cfg.in_channels, generator=g)
    encoder = torch.randn(2, text, cfg.joint_attention_dim, generator=g)
    with torch.no_grad():
        return transformer(
            hidden_states=hidden,
            encoder_hidden_states=encoder,
            encoder_hidden_states_mask=torch.ones(2, text, dtype=torch.long),
            timestep=torch.tensor([0.5, 0.25]),
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]


def test_swap_keeps_parameters_and_output_on_cpu(qwen_image_rl_pipe):
    transformer = qwen_image_rl_pipe.transformer
    keys = list(transformer.state_dict())
    projs = [m.proj for m in transformer.modules() if type(m) is GELU]
    before = _forward(transformer)
    try:
        swapped = use_gelu_epilogue(transformer)
        assert swapped == 2 * transformer.config.num_layers == len(projs)  # img_mlp and txt_mlp of every block
        wrapped = [m for m in transformer.modules() if isinstance(m, EpilogueGELU)]
        assert [m.proj for m in wrapped] == projs  # the same Linear objects: no copy for the optimizer to miss
        assert list(transformer.state_dict()) == keys
        assert not wrapped[0].takes_epilogue(torch.zeros(1, 4, wrapped[0].proj.in_features))  # CPU: diffusers' path
        assert torch.equal(_forward(transformer), before)
        assert use_gelu_epilogue(transformer) == 0  # idempotent: nothing left to swap
    finally:
        restored = use_plain_gelu(transformer)
    assert restored == len(projs)
    assert [m.proj for m in transformer.modules() if type(m) is GELU] == projs


def test_exact_gelu_is_left_alone():
    ff = FeedForward(dim=8, dim_out=8, activation_fn="gelu")  # approximate="none": the epilogue is not that formula
    assert use_gelu_epilogue(ff) == 0
    assert type(ff.net[0]) is GELU
    tanh_ff = FeedForward(dim=8, dim_out=8, activation_fn="gelu-approximate")
    assert use_gelu_epilogue(tanh_ff) == 1
    x = torch.randn(3, 8)
    expected = tanh_ff.net[2](torch.nn.functional.gelu(tanh_ff.net[0].proj(x), approximate="tanh"))
    torch.testing.assert_close(tanh_ff(x), expected, rtol=0, atol=0)


def test_loading_and_config_switch(tiny_qwen_image_dir):
    import pytest

    from verl_omni.config.model import ModelConfig
    from verl_omni.pipelines.loading import load_rl_pipeline

    def swapped(pipe):
        return sum(isinstance(m, EpilogueGELU) for m in pipe.transformer.modules())

    on = load_rl_pipeline(tiny_qwen_image_dir, "qwen_image", "float32", gelu_epilogue=True)
    off = load_rl_pipeline(tiny_qwen_image_dir, "qwen_image", "float32")
    assert swapped(on) == 2 * on.transformer.config.num_layers and swapped(off) == 0
    assert ModelConfig(path=tiny_qwen_image_dir).gelu_epilogue is True
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.model\.gelu_epilogue='yes' must be true or false"):
        ModelConfig(path=tiny_qwen_image_dir, gelu_epilogue="yes")
