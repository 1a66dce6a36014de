"""Tiny random HF Qwen3/Qwen2 models saved to disk, shared by the LLM tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 96
EOS = 5


def tiny_hf_config(family: str) -> transformers.PretrainedConfig:
    """Qwen3: q/k norm, tied, GQA 4:2. Qwen2: qkv bias, untied, GQA 4:1."""
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    )
    if family == "qwen3":
        return transformers.Qwen3Config(
            **common, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    return transformers.Qwen2Config(
        **common, num_key_value_heads=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )


def save_tiny_hf(family: str, out: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Build, randomise (biases and norms too, so they are tested) and save a tiny model to ``out``."""
    torch.manual_seed(seed)
    config = tiny_hf_config(family)
    cls = transformers.Qwen3ForCausalLM if family == "qwen3" else transformers.Qwen2ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("weight"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()


def padded_batch(lengths: list[int], total: int, *, left: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids (never EOS or pad) with ``attention_mask``, padded on the left or the right."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        tokens = rng.integers(EOS + 1, VOCAB, size=n)
        span = slice(total - n, total) if left else slice(0, n)
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """HF's position ids for a padded batch (cumsum of the mask)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)
