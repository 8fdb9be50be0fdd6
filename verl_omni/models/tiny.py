"""Random-weight diffusers pipeline directories built offline, deterministically from a seed.

Tests, the CPU demo and the GPU benchmark need real pipeline directories (loaded through the ordinary
``from_pretrained(dir)`` path, by diffusers or vllm-omni) without any hub access. Every component -- tokenizers
included -- is built from a config here; the same seed gives bit-identical weights.

- :func:`build_tiny_qwen_image` / :func:`build_tiny_sd3`: a few MB, written in about a second.
- :func:`build_qwen_image`: the Qwen-Image layout at full transformer width with a chosen number of layers
  (``qwen_image_transformer_config(num_layers, full_width=True)``), initialised directly in bf16.
- :func:`tiny_model_dir`: build once into a shared cache directory and reuse it.
- :func:`build_tiny_clip` / :func:`build_clip_vit_h14`: a CLIP scorer directory (``CLIPModel`` + ``CLIPProcessor``)
  for the pickscore / clipscore rewards: tiny for tests, or the CLIP-ViT-H-14 (PickScore) sizes for throughput.

Tiny Qwen-Image: VAE factor 8 (as the real one; ``len(temperal_downsample) == 3``), z_dim 4, so the transformer
takes 16 packed channels; image sides must be multiples of 16. Tiny SD3: VAE factor 8, 16 latent channels, patch 2,
sides multiples of 16 too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import torch

# ------------------------------------------------------------------------------------------- real configs
# Qwen/Qwen-Image scheduler/scheduler_config.json: dynamic (resolution-dependent) shifting ending at 0.02.
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
# stabilityai/stable-diffusion-3.5-*/scheduler/scheduler_config.json: static shift 3.
SD35_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

QWEN_IMAGE_TEMPLATE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen_image_transformer_config(num_layers: int, full_width: bool) -> dict[str, Any]:
    """QwenImageTransformer2DModel kwargs: real Qwen-Image sizes when ``full_width`` (24 heads x 128 = 3072 wide,
    joint_attention_dim 3584, 64 in / 16 out channels; the real model has 60 layers), else the tiny CPU sizes.

    ``attention_head_dim`` stays 128 with rope axes (16, 56, 56) in both cases (FA3 needs head_dim >= 64).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    common = {"patch_size": 2, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": False}
    if full_width:
        return {
            **common,
            "num_layers": num_layers,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "in_channels": 64,
            "out_channels": 16,
        }
    return {
        **common,
        "num_layers": num_layers,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "in_channels": 16,
        "out_channels": 4,
    }


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


# ------------------------------------------------------------------------------------------- Qwen-Image
def build_qwen_image_tokenizer():
    """Qwen2Tokenizer over the 256 byte-level symbols (no merges) plus Qwen's chat special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_level_alphabet())}
    for special in QWEN_IMAGE_TEMPLATE_SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _qwen_text_encoder_config(vocab_size: int, tokenizer, full_width: bool):
    from transformers import Qwen2_5_VLConfig

    if full_width:  # Qwen2.5-VL-7B width (hidden 3584 = joint_attention_dim), fewer layers and a narrower MLP
        text = dict(
            hidden_size=3584,
            intermediate_size=4096,
            num_hidden_layers=2,
            num_attention_heads=28,
            num_key_value_heads=4,
            mrope_section=[16, 24, 24],
        )
    else:
        text = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[2, 3, 3],
        )  # head_dim 16: sections sum to 8
    mrope = text.pop("mrope_section")
    assert sum(mrope) * 2 == text["hidden_size"] // text["num_attention_heads"]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0},
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            **text,
        ),
        # The pipeline never runs the vision tower; keep it minimal.
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text["hidden_size"],
            fullatt_block_indexes=[0],
        ),
    )


def _qwen_vae_config(full_width: bool) -> dict[str, Any]:
    if full_width:  # the real AutoencoderKLQwenImage (diffusers defaults: base 96, z 16, factor 8)
        return {}
    return {
        "base_dim": 16,
        "z_dim": 4,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],  # 3 downsamples -> factor 8, as the real VAE
        "latents_mean": [0.1, -0.2, 0.05, 0.0],
        "latents_std": [1.5, 2.0, 1.2, 1.8],
    }


def build_qwen_image(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    full_width: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **transformer_overrides: Any,
) -> str:
    """Write a random-weight Qwen-Image pipeline directory; return its path.

    ``full_width=True`` gives the real transformer width, a 3584-wide 2-layer text encoder and the real-size VAE;
    modules are constructed directly in ``dtype`` (use bf16) so no float32 copy of the weights is materialised.
    ``device`` (default: the CPU) is where the modules are constructed and their random weights drawn. PyTorch's
    CPU random fills run on one thread, so a full-width build on the GPU takes seconds where the CPU takes
    minutes. ``device="cuda"`` gives other values than a CPU build, equally seeded.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = torch.device(device) if device is not None else None

    init_dtype = dtype if full_width else torch.float32  # tiny: init in fp32 so every dtype sees the same values
    tokenizer = build_qwen_image_tokenizer()
    transformer_kwargs = {**qwen_image_transformer_config(num_layers, full_width), **transformer_overrides}

    with _seeded_init(seed, init_dtype, device):
        transformer = QwenImageTransformer2DModel(**transformer_kwargs)
    with _seeded_init(seed + 1, init_dtype, device):
        vae = AutoencoderKLQwenImage(**_qwen_vae_config(full_width))
    with _seeded_init(seed + 2, init_dtype, device):
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            _qwen_text_encoder_config(len(tokenizer), tokenizer, full_width)
        )
    if vae.config.z_dim * 4 != transformer.config.in_channels:
        raise ValueError(
            f"transformer in_channels={transformer.config.in_channels} must be 4 x VAE z_dim={vae.config.z_dim}"
        )
    for offset, module in enumerate((transformer, vae, text_encoder)):
        _randomize_zero_params(module, seed + 100 + offset)

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=tokenizer,
        transformer=transformer.to(dtype).eval(),
    )
    pipe.save_pretrained(str(path))
    return str(path)


def build_tiny_qwen_image(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> str:
    """Tiny random Qwen-Image (2 transformer layers, 2 heads x 128; ~3 MB in float32). ``overrides`` go to the
    transformer config (e.g. ``num_layers=1``). Save in bf16 for vllm-omni (it rejects a float32 text encoder).

    Note: the stock ``QwenImagePipeline`` drops a hard-coded 34 template tokens; with this byte-level tokenizer
    the template prefix is longer. ``QwenImageRLPipeline`` computes the right value from its tokenizer.
    """
    num_layers = int(overrides.pop("num_layers", 2))
    return build_qwen_image(path, num_layers=num_layers, full_width=False, seed=seed, dtype=dtype, **overrides)


# ------------------------------------------------------------------------------------------- SD3
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


def build_t5_tokenizer():
    """T5Tokenizer (Unigram) over single printable ASCII characters; anything else maps to <unk>."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_sd3(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, **transformer_overrides: Any
) -> str:
    """Tiny random SD3.5-style pipeline (2 MMDiT layers with qk RMSNorm, two CLIPs + T5, 16-channel VAE).
    ``transformer_overrides``: ``SD3Transformer2DModel`` keyword arguments (e.g. ``attention_head_dim=64``, the
    real head dim, which a GPU's FA3 takes; the tiny default is 32)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    clip_hidden, t5_hidden = 32, 64  # T5 width >= the two CLIP widths concatenated (the pipeline pads CLIP to it)

    def clip_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            projection_dim=hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )

    transformer_config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=t5_hidden,
        caption_projection_dim=64,
        pooled_projection_dim=2 * clip_hidden,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
    )
    with _seeded_init(seed, torch.float32):
        transformer = SD3Transformer2DModel(**{**transformer_config, **transformer_overrides})
    with _seeded_init(seed + 1, torch.float32):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            layers_per_block=1,
            norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=64,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    with _seeded_init(seed + 2, torch.float32):
        text_encoder = CLIPTextModelWithProjection(clip_config(clip_hidden))
    with _seeded_init(seed + 3, torch.float32):
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(clip_hidden))
    with _seeded_init(seed + 4, torch.float32):
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=t5_hidden,
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
        )
    modules = (transformer, vae, text_encoder, text_encoder_2, text_encoder_3)
    for offset, module in enumerate(modules):
        _randomize_zero_params(module, seed + 100 + offset)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to(dtype).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG),
        vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.to(dtype).eval(),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=text_encoder_3.to(dtype).eval(),
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(str(path))
    return str(path)


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


# ------------------------------------------------------------------------------------------- cache
TINY_BUILDERS = {"qwen_image": build_tiny_qwen_image, "sd3": build_tiny_sd3}
_BUILT: dict[tuple[str, str], str] = {}
_LOCK = threading.Lock()


def _builder_fingerprint(kind: str) -> str:
    """Changes whenever this file, the file of ``kind``'s builder (a family may register its own: see
    ``verl_omni.pipelines``) or the libraries that define the on-disk format change."""
    import inspect

    import diffusers
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    builder_file = inspect.getsourcefile(TINY_BUILDERS[kind])
    if builder_file and Path(builder_file).resolve() != Path(__file__).resolve():
        digest.update(Path(builder_file).read_bytes())
    digest.update(f"{diffusers.__version__}|{transformers.__version__}|{torch.__version__}".encode())
    return digest.hexdigest()[:12]


def tiny_model_dir(kind: str, root: Optional[str | os.PathLike] = None) -> str:
    """Path of the tiny ``kind`` pipeline (a ``TINY_BUILDERS`` key: 'qwen_image', 'sd3'; 'flux' once
    ``verl_omni.pipelines`` is imported; seed 0, float32), built on first use.

    The directory lives under ``root`` (default ``$VERL_OMNI_TINY_MODELS`` or ``<tmp>/verl_omni_tiny_models``) and
    is keyed by a fingerprint of this builder, so processes share it and a changed builder never reuses a stale
    one. It is written to a scratch directory first and renamed into place, so readers never see half a model.
    """
    if kind not in TINY_BUILDERS:
        raise ValueError(
            f"unknown tiny model kind {kind!r}; allowed: {sorted(TINY_BUILDERS)} (a family whose builder lives in its "
            "pipeline package, e.g. flux, registers it when verl_omni.pipelines is imported)"
        )
    root = Path(
        root or os.environ.get("VERL_OMNI_TINY_MODELS") or Path(tempfile.gettempdir()) / "verl_omni_tiny_models"
    )
    target = root / f"{kind}-{_builder_fingerprint(kind)}"
    key = (kind, str(target))
    with _LOCK:
        if key in _BUILT:
            return _BUILT[key]
        if not (target / "model_index.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
            try:
                TINY_BUILDERS[kind](scratch)
                try:
                    os.replace(scratch, target)
                except OSError:  # another process won the race; its copy is identical
                    if not (target / "model_index.json").exists():
                        raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        _BUILT[key] = str(target)
        return _BUILT[key]


__all__ = [
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "SD35_SCHEDULER_CONFIG",
    "build_clip_tokenizer",
    "build_clip_vit_h14",
    "build_qwen_image",
    "build_qwen_image_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_clip",
    "build_tiny_qwen_image",
    "build_tiny_sd3",
    "qwen_image_transformer_config",
    "tiny_model_dir",
]
