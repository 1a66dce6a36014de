"""Tiny XEmoGPT runs for the inference and serving tests (written by :mod:`xemogpt_jax.testing.run_checkpoint`).

``tiny_run_config`` and ``save_tokenizer`` give the run a byte-level tokenizer folder. ``script_reply``
turns a random model into one whose greedy/beam output is known in advance: every attention and
MLP output is zeroed, so the last position's hidden state is its own token embedding, and the
(untied) LM head maps every ordinary embedding to one reply token and that token's embedding to
EOS. The reply token is an added token whose text is the whole reply.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import sft
from xemogpt_jax import run_config
from xemogpt_jax.models.xemogpt import XEmoGPT
from xemogpt_jax.testing.byte_tokenizer import byte_tokenizer

MEDIA = Path(__file__).resolve().parents[2] / "shared/media"


def shared_clip() -> tuple[Path, Path]:
    """The real clip and its wav; fails loudly when the shared media folder is missing."""
    video, audio = MEDIA / "sample_00000007.mp4", MEDIA / "sample_00000007.wav"
    if not (video.exists() and audio.exists()):
        raise FileNotFoundError(f"shared media missing: expected {video} and {audio}")
    return video, audio


def tiny_run_config(tokenizer_dir: Path, vocab_size: int, *, tied: bool = True) -> ml_collections.ConfigDict:
    """``configs/sft.py:tiny`` with the tokenizer's vocabulary and buckets that hold the byte-level prompt."""
    config = sft.get_config("tiny")
    config.init_from.tokenizer = str(tokenizer_dir)
    run_config.set_architecture(config, "llm", vocab_size=vocab_size, tie_word_embeddings=tied)
    config.data.max_audio_seconds = 2.0
    config.data.max_context = 1024
    config.data.length_buckets = (512, 1024)
    return config


def save_tokenizer(out: Path, extra_tokens: list[str] = ()) -> object:
    tokenizer = byte_tokenizer()
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    tokenizer.save_pretrained(out)
    return tokenizer


def script_reply(model: XEmoGPT, reply_id: int, eos_id: int, scale: float = 40.0) -> None:
    """Make greedy/beam decoding answer ``[reply_id, eos_id]`` whatever the prompt (needs an untied head)."""
    llm = model.llm
    assert llm.lm_head is not None, "script_reply needs tie_word_embeddings=False"
    for layer_param in (llm.layers.self_attn.o_proj.kernel, llm.layers.mlp.down_proj.kernel):
        layer_param[...] = jnp.zeros_like(layer_param[...])
    table = np.array(llm.embed_tokens.embedding[...])
    hidden = table.shape[1]
    ordinary, special = np.zeros(hidden, np.float32), np.zeros(hidden, np.float32)
    ordinary[0], special[1] = 1.0, 1.0
    table[:] = ordinary
    table[reply_id] = special
    llm.embed_tokens.embedding[...] = jnp.asarray(table)
    llm.norm.scale[...] = jnp.ones_like(llm.norm.scale[...])
    head = np.zeros((hidden, table.shape[0]), np.float32)
    head[0, reply_id] = scale
    head[1, eos_id] = scale
    llm.lm_head.kernel[...] = jnp.asarray(head)
