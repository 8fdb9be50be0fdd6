"""Random-weight building blocks for pipeline directories built offline, deterministically from a seed.

Tests, the CPU demo and the GPU benchmark need real pipeline directories (loaded through the ordinary
``from_pretrained(dir)`` path, by diffusers or vllm-omni) without any hub access. Every component -- tokenizers
included -- is built from a config; the same seed gives bit-identical weights. Each model family's own builders are
in its package (``verl_omni/pipelines/<family>/standin.py``; ``tiny:<family>`` through
``verl_omni.pipelines.tiny.tiny_model_dir``); what they share is here:

- :func:`_seeded_init`, :func:`_randomize_zero_params`: seeded module construction, no constant outputs;
- :func:`build_clip_tokenizer` / :func:`build_t5_tokenizer`: scratch CLIP and T5 tokenizers;
- :func:`build_tiny_clip` / :func:`build_clip_vit_h14`: a CLIP scorer directory (``CLIPModel`` + ``CLIPProcessor``)
  for the pickscore / clipscore rewards: tiny for tests, or the CLIP-ViT-H-14 (PickScore) sizes for throughput.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch


# ------------------------------------------------------------------------------------------- utilities
@contextlib.contextmanager
def _seeded_init(seed: int, dtype: torch.dtype, device: Optional[torch.device] = None):
    """Seed torch's RNG and set the default dtype (and device, when given) for module construction, restoring
    them afterwards."""
    previous = torch.get_default_dtype()
    cuda_devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    on_device = device if device is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=cuda_devices), on_device:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def _randomize_zero_params(module: torch.nn.Module, seed: int) -> None:
    """Zero-initialised weights (AdaLN modulation, output projections) would make a random model output a
    constant; give them small random values so outputs depend on every input. The noise is drawn on the
    parameters' device (a CPU build's values do not depend on whether a GPU exists)."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for param in module.parameters():
            if param.numel() and not param.any():
                gen = generators.setdefault(param.device, torch.Generator(param.device).manual_seed(seed))
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32, device=param.device) * 0.02
                param.copy_(noise.to(param.dtype))


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


# ------------------------------------------------------------------------------------------- tokenizers
def build_clip_tokenizer():
    """CLIPTokenizer over byte-level symbols (plus their end-of-word forms), no merges; 77 tokens as CLIP."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip_text_config(tokenizer, hidden: int):
    """A 2-layer, 4-head CLIP text encoder of width ``hidden`` over ``tokenizer`` (77 positions, as CLIP): the tiny
    models' CLIP-L / bigG."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_t5_encoder_config(tokenizer, hidden: int):
    """A 2-layer, 4-head gated-GELU T5 encoder of width ``hidden`` over ``tokenizer``: the tiny models' T5-XXL."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_autoencoder_kl(scaling_factor: float, shift_factor: float):
    """A random 16-latent-channel ``AutoencoderKL`` with the published 8x downsampling (4 blocks, 8-16 channels wide)
    and the given latent scaling: the tiny models' FLUX / SD3 VAE. Build it under ``_seeded_init``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_t5_tokenizer():
    """T5Tokenizer (Unigram) over single printable ASCII characters; anything else maps to <unk>."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# ------------------------------------------------------------------------------------------- CLIP scorers
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json (PickScore_v1 is a fine-tune of it: same sizes).
CLIP_VIT_H14_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
)
CLIP_VIT_H14_VISION = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    hidden_act="gelu",
)
CLIP_VIT_H14_PROJECTION_DIM = 1024
# OpenAI CLIP normalisation, used by every CLIP/PickScore processor config.
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _save_clip(path, text: dict, vision: dict, projection_dim: int, seed: int, dtype: torch.dtype, device: str) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            text,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=vision,
        projection_dim=projection_dim,
    )
    with _seeded_init(seed, dtype, torch.device(device)):
        model = CLIPModel(config)
    model.eval().save_pretrained(str(path))
    side = vision["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(path))
    return str(path)


def build_tiny_clip(path: str | os.PathLike, seed: int = 0) -> str:
    """Tiny random CLIP scorer directory (2-layer 32-wide towers, 32x32 images; ~0.5 MB), loadable with
    ``CLIPModel.from_pretrained`` + ``AutoProcessor.from_pretrained``."""
    text = dict(
        vocab_size=len(build_clip_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
        image_size=32,
        hidden_act="gelu",
    )
    return _save_clip(path, text, vision, projection_dim=16, seed=seed, dtype=torch.float32, device="cpu")


def build_clip_vit_h14(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> str:
    """Random CLIP at the CLIP-ViT-H-14 / PickScore sizes (~1B parameters), initialised directly in ``dtype`` on
    ``device`` (use "cuda" on a GPU machine: seconds instead of minutes); the tokenizer is the scratch one."""
    return _save_clip(path, CLIP_VIT_H14_TEXT, CLIP_VIT_H14_VISION, CLIP_VIT_H14_PROJECTION_DIM, seed, dtype, device)


__all__ = [
    "build_clip_tokenizer",
    "build_clip_vit_h14",
    "build_t5_tokenizer",
    "build_tiny_clip",
]
