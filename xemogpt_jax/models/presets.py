"""Named architectures, each written once as the HF ``config.json`` fields of the model it names.

Run configs name a preset per part (``model.llm = "qwen3-4b"``, ``model.clip = "tiny"``) or hold
the fields themselves (a dict, as run configs stored in older checkpoints do); an ``init_from``
folder's own ``config.json`` wins over both (:func:`xemogpt_jax.run_config.architecture`). The
published presets carry the fields of the published ``config.json`` that the ports read, so a
random-init model at paper scale is the published architecture; ``tiny`` ones size the CPU demo.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# Qwen/Qwen3-4B
QWEN3_4B: dict[str, Any] = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=2560,
    intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000, rope_scaling=None, max_position_embeddings=40960,
    tie_word_embeddings=True, attention_bias=False, use_sliding_window=False, bos_token_id=151643,
    eos_token_id=151645,
)
# Qwen/Qwen2.5-7B-Instruct
QWEN2_5_7B: dict[str, Any] = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
    tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
)
# openai/clip-vit-large-patch14 (CLIPModel: both towers and the shared projection width)
CLIP_VIT_L14: dict[str, Any] = dict(
    architectures=["CLIPModel"], model_type="clip", projection_dim=768, logit_scale_init_value=2.6592,
    vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    ),
    text_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
)
# TencentGameMate/chinese-hubert-large (stable-layer-norm HuBERT-large)
HUBERT_LARGE: dict[str, Any] = dict(
    architectures=["HubertModel"], model_type="hubert", hidden_size=1024, num_hidden_layers=24,
    num_attention_heads=16, intermediate_size=4096, hidden_act="gelu", layer_norm_eps=1e-5,
    conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=True,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, feat_extract_norm="layer",
    feat_extract_activation="gelu", do_stable_layer_norm=True, mask_time_prob=0.05,
    mask_feature_prob=0.0,
)
# sentence-transformers/LaBSE: the BERT at the folder's root
LABSE: dict[str, Any] = dict(
    architectures=["BertModel"], model_type="bert", vocab_size=501153, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
    type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute",
)

# The CPU demo's sizes (configs/*.py:tiny); its recorded results depend on every value here.
TINY_QWEN3: dict[str, Any] = dict(
    model_type="qwen3", vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=True,
)
TINY_CLIP: dict[str, Any] = dict(
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=64, patch_size=16, hidden_act="quick_gelu"),
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=2048, max_position_embeddings=77, eos_token_id=1, hidden_act="quick_gelu"),
    projection_dim=32,
)
TINY_HUBERT: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    conv_dim=[32, 32, 32], conv_kernel=[10, 8, 8], conv_stride=[5, 8, 8],
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
)
TINY_BERT: dict[str, Any] = dict(
    vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=128,
)

# part of a run config's ``model`` -> preset name -> fields
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "llm": {"qwen3-4b": QWEN3_4B, "qwen2.5-7b": QWEN2_5_7B, "tiny": TINY_QWEN3},
    "clip": {"clip-vit-l14": CLIP_VIT_L14, "tiny": TINY_CLIP},
    "hubert": {"hubert-large": HUBERT_LARGE, "tiny": TINY_HUBERT},
    "text_encoder": {"labse": LABSE, "tiny": TINY_BERT},
}


def get(part: str, name: str) -> dict[str, Any]:
    """A fresh copy of preset ``name`` of ``part`` (callers may change it without touching the table)."""
    if part not in PRESETS:
        raise KeyError(f"no presets for {part!r}; parts: {sorted(PRESETS)}")
    if name not in PRESETS[part]:
        raise KeyError(f"unknown {part} preset {name!r}; choose one of {sorted(PRESETS[part])}")
    return copy.deepcopy(PRESETS[part][name])


def fields(part: str, value: str | Mapping[str, Any]) -> dict[str, Any]:
    """HF fields of ``value``: a preset name, or the fields themselves (a dict or ConfigDict)."""
    if isinstance(value, str):
        return get(part, value)
    to_dict = getattr(value, "to_dict", None)
    return copy.deepcopy(to_dict() if to_dict else dict(value))
