"""The faithful stand-ins have the real checkpoints' architecture: every component's config equals the figures the
real repositories publish (transcribed below from their config.json files on the Hugging Face hub), tokenizers have
the real vocabulary sizes and special-token ids, and the parameter count of every component matches the published
checkpoint's (the safetensors index sizes / 2 bytes). Everything is built on the meta device: no real-size
allocation."""

import json
from pathlib import Path

import pytest
import torch

from verl_omni.models.standins import read_standin_record, stored_counts
from verl_omni.pipelines.standins import build_components, build_standin, published_config

# ------------------------------------------------------------------------------------------- published figures
# Qwen/Qwen-Image transformer/config.json
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=[16, 56, 56],
)
# Qwen/Qwen-Image vae/config.json
QWEN_IMAGE_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508]
    + [0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743]
    + [3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
)
# Qwen/Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B-Instruct): language model and vision tower
QWEN_VL_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    hidden_act="silu",
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
)
QWEN_VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
QWEN_VL_TOP = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, tie_word_embeddings=False
)
# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER = dict(
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X)
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=list(range(13)),
    qk_norm="rms_norm",
)
# The 16-channel AutoencoderKL of SD3.5 and FLUX.1 (vae/config.json); scaling/shift differ per family.
KL16_VAE = dict(
    latent_channels=16,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# openai/clip-vit-large-patch14 text tower (SD3.5 text_encoder, FLUX.1-dev text_encoder)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (SD3.5 text_encoder_2)
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
)
# google/t5-v1_1-xxl encoder (SD3.5 text_encoder_3, FLUX.1-dev text_encoder_2)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
)
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
FLUX_DEV_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)

# Values each checkpoint stores per component: its safetensors index total_size / 2 (bf16) where exact, else the
# published parameter count (within 1%).
PUBLISHED_TOTALS = {
    "qwen_image": {"transformer": 40_860_802_176 // 2, "text_encoder": 16_584_333_312 // 2, "vae": 127e6},
    "flux": {
        "transformer": 23_802_816_640 // 2,
        "text_encoder": 123e6,
        "text_encoder_2": 9_524_621_312 // 2,
        "vae": 84e6,
    },
    "sd3": {
        "transformer": 2.47e9,  # 2.24B parameters + the 384 x 384 x 1536 positional-embedding table
        "text_encoder": 123e6,
        "text_encoder_2": 695e6,
        "text_encoder_3": 9_524_621_312 // 2,
        "vae": 84e6,
    },
}


# ------------------------------------------------------------------------------------------- helpers
def _same(actual, expected):
    if isinstance(expected, float):
        return actual == pytest.approx(expected)
    if isinstance(expected, list):
        return list(actual) == expected
    return actual == expected


def _assert_config(config, expected: dict, where: str):
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
    wrong = {k: (get(k), v) for k, v in expected.items() if not _same(get(k), v)}
    assert not wrong, f"{where}: (stand-in, published) differ: {wrong}"


@pytest.fixture(scope="module")
def meta_components():
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_components(family, device="meta")
        return built[family]

    return get


# ------------------------------------------------------------------------------------------- configs
def test_qwen_image_components_have_the_published_configs(meta_components):
    c = meta_components("qwen_image")
    _assert_config(c["transformer"].config, QWEN_IMAGE_TRANSFORMER, "transformer")
    _assert_config(c["vae"].config, QWEN_IMAGE_VAE, "vae")
    text = c["text_encoder"].config
    assert type(c["text_encoder"]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    _assert_config(text.text_config, QWEN_VL_TEXT, "text_encoder.text_config")
    assert text.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.text_config.rope_parameters["rope_theta"] == 1_000_000.0
    _assert_config(text.vision_config, QWEN_VL_VISION, "text_encoder.vision_config")
    _assert_config(text, QWEN_VL_TOP, "text_encoder")
    _assert_config(c["scheduler"].config, QWEN_IMAGE_SCHEDULER, "scheduler")
    tok = c["tokenizer"]
    assert len(tok) == 151665  # 151,643 BPE entries + 22 special tokens
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|file_sep|>"])
    assert ids == [151643, 151644, 151645, 151655, 151664]
    assert tok.pad_token_id == 151643
    assert tok("<|im_start|>user").input_ids[0] == 151644  # special tokens are matched whole in text


def test_sd35_medium_components_have_the_published_configs(meta_components):
    c = meta_components("sd3")
    _assert_config(c["transformer"].config, SD35M_TRANSFORMER, "transformer")
    _assert_config(c["vae"].config, {**KL16_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}, "vae")
    assert [type(c[k]).__name__ for k in ("text_encoder", "text_encoder_2", "text_encoder_3")] == [
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "T5EncoderModel",
    ]
    _assert_config(c["text_encoder"].config, CLIP_L, "text_encoder")
    _assert_config(c["text_encoder_2"].config, CLIP_BIGG, "text_encoder_2")
    _assert_config(c["text_encoder_3"].config, T5_XXL, "text_encoder_3")
    _assert_config(c["scheduler"].config, dict(shift=3.0, use_dynamic_shifting=False), "scheduler")
    for name in ("tokenizer", "tokenizer_2"):
        tok = c[name]
        assert len(tok) == 49408 and tok.model_max_length == 77
        assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert c["tokenizer"].pad_token_id == 49407 and c["tokenizer_2"].pad_token_id == 0  # bigG pads with "!"
    t5 = c["tokenizer_3"]
    assert len(t5) == 32100 and t5.model_max_length == 512
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]


def test_flux_dev_components_have_the_published_configs(meta_components):
    c = meta_components("flux")
    _assert_config(c["transformer"].config, FLUX_DEV_TRANSFORMER, "transformer")
    _assert_config(c["vae"].config, {**KL16_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}, "vae")
    assert [type(c[k]).__name__ for k in ("text_encoder", "text_encoder_2")] == ["CLIPTextModel", "T5EncoderModel"]
    _assert_config(c["text_encoder"].config, CLIP_L, "text_encoder")
    _assert_config(c["text_encoder_2"].config, T5_XXL, "text_encoder_2")
    _assert_config(c["scheduler"].config, FLUX_DEV_SCHEDULER, "scheduler")
    assert len(c["tokenizer"]) == 49408 and len(c["tokenizer_2"]) == 32100


@pytest.mark.parametrize("family", ["qwen_image", "sd3", "flux"])
def test_every_component_stores_the_published_number_of_values(meta_components, family):
    counts = stored_counts(meta_components(family))
    assert set(counts) == set(PUBLISHED_TOTALS[family])
    for name, published in PUBLISHED_TOTALS[family].items():
        assert counts[name] == pytest.approx(published, rel=0.01), f"{family} {name}: {counts[name]:,}"


def test_every_model_is_built_in_the_requested_dtype(meta_components):
    for family in ("qwen_image", "sd3", "flux"):
        for name, component in meta_components(family).items():
            if isinstance(component, torch.nn.Module):
                dtypes = {p.dtype for p in component.parameters()}
                assert dtypes == {torch.bfloat16}, f"{family} {name}: {dtypes}"


def test_qwen_image_transformer_and_vae_stay_those_of_the_full_width_builder(meta_components):
    """The benchmarks' earlier real-size model (``build_qwen_image(full_width=True)``) and the stand-in share the
    transformer and VAE configuration, so figures of both compare."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from verl_omni.pipelines.qwen_image.standin import _qwen_vae_config, qwen_image_transformer_config

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**qwen_image_transformer_config(60, full_width=True))
        vae = AutoencoderKLQwenImage(**_qwen_vae_config(full_width=True))
    c = meta_components("qwen_image")

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(c["transformer"].config) == public(transformer.config)
    assert public(c["vae"].config) == public(vae.config)


def test_published_config_is_a_copy_and_names_unknown_families():
    first = published_config("flux")
    first["transformer"]["num_layers"] = 1
    assert published_config("flux")["transformer"]["num_layers"] == 19
    with pytest.raises(
        ValueError, match="stand-in family='sdxl'.*registered: \\['flux', 'qwen_image', 'sd3', 'wan'\\]"
    ):
        published_config("sdxl")


def test_each_family_keeps_its_published_configs_in_its_own_package():
    """A family's stand-in is found through the registry in ``verl_omni/pipelines/<family>/published.py``; a family
    without one says so, naming the module it looked for."""
    from verl_omni.pipelines.registry import ModelFamily, registered_families

    for name, family in registered_families().items():
        assert family.published().__name__ == f"verl_omni.pipelines.{name}.published"

    class NoStandIn(ModelFamily):
        name = "no_stand_in"

    with pytest.raises(NotImplementedError, match=f"'no_stand_in' has no {__name__}.published"):
        NoStandIn.published()


# ------------------------------------------------------------------------------------------- the directory
def test_a_meta_build_writes_a_loadable_skeleton_with_its_record(tmp_path):
    """``build_standin`` end to end on the meta device: the directory's configs, tokenizers and record read back
    as the real checkpoint's; ``layers`` truncates the transformer and nothing else."""
    from diffusers import FluxTransformer2DModel
    from transformers import AutoConfig, AutoTokenizer

    path = Path(build_standin("flux", tmp_path / "flux", layers=2, device="meta"))
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    transformer = FluxTransformer2DModel.load_config(path / "transformer")
    assert (transformer["num_layers"], transformer["num_single_layers"]) == (2, 4)
    _assert_config(AutoConfig.from_pretrained(path / "text_encoder_2"), T5_XXL, "saved text_encoder_2")
    _assert_config(AutoConfig.from_pretrained(path / "text_encoder"), CLIP_L, "saved text_encoder")
    assert len(AutoTokenizer.from_pretrained(path / "tokenizer_2")) == 32100
    assert not list(path.rglob("*.safetensors"))
    record = read_standin_record(path)
    assert record["family"] == "flux" and record["checkpoint"] == "black-forest-labs/FLUX.1-dev"
    assert (record["layers"], record["published_layers"], record["weights"]) == (2, 19, False)
    assert record["params"]["text_encoder_2"] == 9_524_621_312 // 2  # the encoders stay whole
    assert record["params"]["transformer"] < 11_901_408_320 / 5


def test_the_qwen_image_skeleton_reads_back_as_the_real_text_encoder_and_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = Path(build_standin("qwen_image", tmp_path / "qwen", layers=1, device="meta"))
    text = AutoConfig.from_pretrained(path / "text_encoder")
    _assert_config(text.text_config, QWEN_VL_TEXT, "saved text_encoder")
    _assert_config(text.vision_config, QWEN_VL_VISION, "saved text_encoder vision")
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    assert len(tok) == 151665 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert read_standin_record(path)["layers"] == 1


def test_layers_outside_the_published_depth_are_refused():
    with pytest.raises(ValueError, match="layers=25 must be between 1 and the published depth 24"):
        build_components("sd3", layers=25, device="meta")
