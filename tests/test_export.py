"""Export of a trained adapter (verl_omni/export): the diffusers LoRA file loads into the base pipeline with
``load_lora_weights`` and the merged pipeline directory loads with ``from_pretrained``; both give the transformer
outputs of our adapter on the tiny Qwen-Image."""

import json

import pytest
import torch
from diffusers import QwenImagePipeline

from verl_omni.export import EMA_FILE, read_adapter
from verl_omni.export.__main__ import main as export_main
from verl_omni.models.lora import LoRASpec, get_lora_state_dict, init_lora_weights, lora_parameters
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.trainer.checkpoint import save_checkpoint

RANK, ALPHA = 4, 12.0  # alpha != rank: the exported file must carry the scaling


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


@pytest.fixture(scope="module")
def trained(tiny_qwen_image_dir, tmp_path_factory):
    """A checkpoint of a non-trivial adapter (B not zero, as after training) and the transformer serving it."""
    pipe = load_rl_pipeline(tiny_qwen_image_dir, "qwen_image", "float32", LoRASpec(RANK, ALPHA))
    init_lora_weights(pipe.transformer, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(pipe.transformer):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    optimizer = torch.optim.AdamW(lora_parameters(pipe.transformer))
    root = tmp_path_factory.mktemp("run")
    meta = {"lora": {"rank": RANK, "alpha": ALPHA, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}}
    save_checkpoint(str(root), 3, get_lora_state_dict(pipe.transformer), optimizer, meta)
    return root, pipe.transformer


def test_exported_lora_loads_into_the_base_pipeline_with_the_same_outputs(trained, tiny_qwen_image_dir, tmp_path):
    root, transformer = trained
    out = tmp_path / "lora"
    assert export_main(["--checkpoint", str(root), "--base", tiny_qwen_image_dir, "--out", str(out)]) == 0
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_dir)
    base_out = _forward(pipe.transformer)
    pipe.load_lora_weights(str(out))
    loaded = _forward(pipe.transformer)
    ours = _forward(transformer)
    assert not torch.allclose(base_out, ours, atol=1e-4)  # the adapter changes the output ...
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-5)  # ... and the export carries that change
    info = json.loads((out / "verl_omni_export.json").read_text())
    assert (info["step"], info["rank"], info["alpha"], info["merged"]) == (3, RANK, ALPHA, False)


def test_merged_pipeline_directory_loads_with_from_pretrained(trained, tiny_qwen_image_dir, tmp_path):
    root, transformer = trained
    out = tmp_path / "merged"
    export_main(["--checkpoint", str(root / "global_step_3"), "--base", tiny_qwen_image_dir, "--out", str(out)])
    export_main(
        ["--checkpoint", str(root), "--base", tiny_qwen_image_dir, "--out", str(out), "--merge", "--lora-alpha", "12"]
    )
    merged = QwenImagePipeline.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in merged.transformer.named_parameters())
    torch.testing.assert_close(_forward(merged.transformer), _forward(transformer), rtol=1e-4, atol=1e-4)


def test_missing_alpha_and_missing_ema_are_named(trained, tmp_path):
    root, transformer = trained
    older = tmp_path / "older"  # a checkpoint whose meta does not record the adapter's config
    save_checkpoint(str(older), 1, get_lora_state_dict(transformer), torch.optim.AdamW(lora_parameters(transformer)))
    with pytest.raises(ValueError, match="--lora-alpha"):
        read_adapter(str(older))
    assert read_adapter(str(older), alpha=ALPHA).target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    with pytest.raises(FileNotFoundError, match=EMA_FILE):
        read_adapter(str(root), "ema", alpha=ALPHA)
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        read_adapter(str(tmp_path / "nowhere"), alpha=ALPHA)


def test_the_policy_ema_is_exported_when_the_checkpoint_holds_it_verified(trained, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from verl_omni.core.checksum import tensors_checksum
    from verl_omni.export import resolve_base
    from verl_omni.trainer.checkpoint import DamagedCheckpointError, _sha256

    root, transformer = trained
    step = tmp_path / "global_step_3"
    shutil.copytree(root / "global_step_3", step)
    ema = {k: v * 0.5 for k, v in get_lora_state_dict(transformer).items()}  # the EMA file: same names, other values
    save_file(ema, str(step / EMA_FILE), metadata={"optimizer_steps": "3"})
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][EMA_FILE] = _sha256(str(step / EMA_FILE))
    (step / "meta.json").write_text(json.dumps(meta))
    adapter = read_adapter(str(step), "ema")
    assert adapter.weights == "ema" and adapter.checksum == tensors_checksum(ema) != read_adapter(str(step)).checksum
    out = tmp_path / "ema_export"
    export_main(["--checkpoint", str(step), "--base", "tiny:qwen_image", "--out", str(out), "--weights", "ema"])
    pipe = QwenImagePipeline.from_pretrained(resolve_base("tiny:qwen_image"))
    pipe.load_lora_weights(str(out))
    assert json.loads((out / "verl_omni_export.json").read_text())["checksum"] == tensors_checksum(ema)
    data = bytearray((step / EMA_FILE).read_bytes())
    data[-8:] = bytes(8)
    (step / EMA_FILE).write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=EMA_FILE):
        read_adapter(str(step), "ema")
