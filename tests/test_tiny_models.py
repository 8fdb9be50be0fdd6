"""Tiny random pipelines: deterministic by seed, loadable with from_pretrained, shaped like the real models."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from verl_omni.pipelines.qwen_image.standin import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    build_tiny_qwen_image,
    qwen_image_transformer_config,
)
from verl_omni.pipelines.sd3.standin import build_tiny_sd3
from verl_omni.pipelines.tiny import tiny_model_dir
from verl_omni.pipelines.wan.standin import build_tiny_wan


def _weights(path):
    """{component/file/tensor name: tensor} over every safetensors file of a pipeline directory."""
    out = {}
    for f in sorted(Path(path).rglob("*.safetensors")):
        for name, tensor in load_file(str(f)).items():
            out[f"{f.relative_to(path)}/{name}"] = tensor
    return out


@pytest.mark.parametrize(
    "builder", [build_tiny_qwen_image, build_tiny_sd3, build_tiny_wan], ids=["qwen_image", "sd3", "wan"]
)
def test_same_seed_gives_identical_weights_and_another_seed_does_not(builder, tmp_path):
    a = _weights(builder(tmp_path / "a", seed=3))
    b = _weights(builder(tmp_path / "b", seed=3))
    c = _weights(builder(tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys() and len(a) > 20
    assert all(torch.equal(a[k], b[k]) for k in a)
    differing = sum(not torch.equal(a[k], c[k]) for k in a)
    assert differing > 0.5 * len(a)
    # No all-zero weight matrices: a zero-initialised output projection would make the model output constant.
    assert not [k for k, t in a.items() if t.ndim >= 2 and not t.any()]


def test_tiny_qwen_image_loads_and_looks_like_qwen_image(qwen_image_rl_pipe, tiny_qwen_image_dir):
    pipe = qwen_image_rl_pipe
    index = json.loads((Path(tiny_qwen_image_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"  # a plain diffusers directory
    tcfg = pipe.transformer.config
    assert tcfg.attention_head_dim == 128 and tuple(tcfg.axes_dims_rope) == (16, 56, 56)
    assert tcfg.in_channels == 4 * pipe.vae.config.z_dim and tcfg.out_channels == pipe.vae.config.z_dim
    assert tcfg.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    assert pipe.vae_scale_factor == 8
    text_cfg = pipe.text_encoder.config.text_config
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert sum(text_cfg.rope_parameters["mrope_section"]) * 2 == head_dim
    sched = dict(pipe.scheduler.config)
    assert all(sched[k] == v for k, v in QWEN_IMAGE_SCHEDULER_CONFIG.items())
    # The scratch tokenizer round-trips text and knows the chat special tokens.
    ids = pipe.tokenizer("<|im_start|>user\nHello, wörld!<|im_end|>").input_ids
    assert pipe.tokenizer.decode(ids) == "<|im_start|>user\nHello, wörld!<|im_end|>"
    assert pipe.tokenizer.convert_tokens_to_ids("<|im_start|>") == ids[0]
    assert pipe.text_encoder.get_input_embeddings().num_embeddings >= len(pipe.tokenizer)


def test_tiny_sd3_loads_and_looks_like_sd35(sd3_rl_pipe):
    pipe = sd3_rl_pipe
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 77
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == pipe.vae.config.latent_channels
    clip_widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.text_encoder_3.config.d_model >= clip_widths
    assert pipe.transformer.config.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    t5_ids = pipe.tokenizer_3("a cat").input_ids
    assert t5_ids[-1] == pipe.tokenizer_3.eos_token_id and pipe.tokenizer_3.unk_token_id not in t5_ids


def test_bf16_build_saves_bf16_weights(tmp_path):
    weights = _weights(build_tiny_sd3(tmp_path / "bf16", dtype=torch.bfloat16))
    float_tensors = [t for t in weights.values() if t.is_floating_point()]
    assert float_tensors and all(t.dtype == torch.bfloat16 for t in float_tensors)


def test_tiny_model_dir_builds_once_and_reuses(tmp_path):
    first = tiny_model_dir("sd3", root=tmp_path)
    stamp = (Path(first) / "model_index.json").stat().st_mtime_ns
    assert tiny_model_dir("sd3", root=tmp_path) == first
    assert (Path(first) / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).name]  # no scratch directories left behind
    allowed = r"allowed: .*sd3, wan, wan2_2_t2v, wan2_2_ti2v"  # each family's name and its tiny variants
    with pytest.raises(ValueError, match=rf"tiny model='no_such_family' is not a tiny model; {allowed}"):
        tiny_model_dir("no_such_family", root=tmp_path)


def test_full_width_transformer_config_matches_qwen_image():
    from diffusers import QwenImageTransformer2DModel

    cfg = qwen_image_transformer_config(num_layers=2, full_width=True)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 3072
    assert (cfg["joint_attention_dim"], cfg["in_channels"], cfg["out_channels"]) == (3584, 64, 16)
    with torch.device("meta"):  # shapes only: no memory
        one = QwenImageTransformer2DModel(**qwen_image_transformer_config(1, True))
        two = QwenImageTransformer2DModel(**cfg)
    per_layer = sum(p.numel() for p in two.parameters()) - sum(p.numel() for p in one.parameters())
    # Qwen-Image: ~20.4B parameters over 60 layers -> ~340M per layer.
    assert 3.0e8 < per_layer < 3.8e8


def test_an_explicit_cpu_device_builds_the_default_weights(tmp_path):
    """``device`` moves where the weights are drawn; on the CPU it must not change them (every earlier build and
    the tests' fixtures are CPU builds)."""
    from verl_omni.pipelines.qwen_image.standin import build_qwen_image

    default = _weights(build_qwen_image(tmp_path / "default", num_layers=1, seed=5))
    explicit = _weights(build_qwen_image(tmp_path / "cpu", num_layers=1, seed=5, device="cpu"))
    assert default.keys() == explicit.keys() and len(default) > 20
    assert all(torch.equal(default[k], explicit[k]) for k in default)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no GPU exists")
def test_benchmark_build_falls_back_to_the_cpu_with_a_log_line(tmp_path, capsys, monkeypatch):
    """The benchmarks' full-width build asked for ``device="cuda"`` on a machine without one: it says so and builds
    on the CPU (the real width at one layer, bf16; the light text encoder keeps it small enough for the CPU)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_common import build_model

    path = build_model(str(tmp_path), 1, device="cuda", light_text_encoder=True)
    out = capsys.readouterr().out
    assert "building on cuda failed" in out and f"built {path} on cpu" in out
    assert "parameters: text_encoder 0.149B, transformer 0.380B, vae 0.127B" in out  # one layer, light encoder
    assert (Path(path) / ".complete").exists() and json.loads((Path(path) / "model_index.json").read_text())
    transformer = _weights(Path(path) / "transformer")
    blocks = {k.split("transformer_blocks.")[1].split(".")[0] for k in transformer if "transformer_blocks." in k}
    assert blocks == {"0"} and transformer["diffusion_pytorch_model.safetensors/img_in.weight"].shape[0] == 3072
    assert all(t.dtype == torch.bfloat16 for t in transformer.values() if t.is_floating_point())


def test_tiny_sd3_at_the_real_head_dim_runs_its_transformer(tmp_path):
    """The GPU tests' SD3.5 (head dim 64, which FA3 takes): the caption projection follows the blocks' width, so
    the joint blocks take the text stream."""
    from diffusers import SD3Transformer2DModel

    path = build_tiny_sd3(tmp_path / "sd3", attention_head_dim=64)
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
    cfg = transformer.config
    assert cfg.caption_projection_dim == cfg.attention_head_dim * cfg.num_attention_heads == 128
    with torch.no_grad():
        out = transformer(
            hidden_states=torch.randn(1, cfg.in_channels, 16, 16),
            encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim),
            timestep=torch.tensor([500.0]),
        ).sample
    assert out.shape == (1, cfg.out_channels, 16, 16) and torch.isfinite(out).all()
