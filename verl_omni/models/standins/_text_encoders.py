"""Published configurations of the text encoders (and their tokenizers) SD3.5 and FLUX.1 share."""

from __future__ import annotations

from typing import Any

# openai/clip-vit-large-patch14 text tower, as in the text_encoder/config.json of SD3.5 and FLUX.1-dev.
# bos/eos/pad 0/2/1 are the published values (eos_token_id 2 makes transformers pool at the highest id, the
# end-of-text token, as the original CLIP does).
CLIP_L_TEXT: dict[str, Any] = {
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (OpenCLIP bigG), SD3.5's text_encoder_2/config.json.
OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}

# google/t5-v1_1-xxl, the encoder SD3.5 (text_encoder_3) and FLUX.1-dev (text_encoder_2) load.
T5_V1_1_XXL: dict[str, Any] = {
    "model_type": "t5",
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "dropout_rate": 0.1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

# The tokenizers: CLIP's 49,408 entries (49,406 BPE + start/end of text; bigG pads with "!", id 0) and T5's
# SentencePiece model of 32,000 pieces plus 100 sentinel ids.
CLIP_L_TOKENIZER: dict[str, Any] = {"vocab_size": 49408, "pad_token": "<|endoftext|>", "model_max_length": 77}
OPENCLIP_BIGG_TOKENIZER: dict[str, Any] = {"vocab_size": 49408, "pad_token": "!", "model_max_length": 77}
T5_TOKENIZER: dict[str, Any] = {"piece_count": 32000, "extra_ids": 100, "model_max_length": 512}


def config_kwargs(published: dict[str, Any]) -> dict[str, Any]:
    """A published config.json dict as config-class keyword arguments (``model_type`` and ``architectures`` are
    the class's own)."""
    return {k: v for k, v in published.items() if k not in ("model_type", "architectures")}
