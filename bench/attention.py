"""Attention forward+backward, each of our backends vs PyTorch's ``scaled_dot_product_attention``, one device.

Causal grouped-query attention over a right-padded batch (the LLM's training case), at the paper LLM's
head layout (Qwen3-4B: 32 query heads on 8 KV heads of 128). On a GPU (JAX's default backend) both run
there in bf16: ours with ``cudnn`` and ``xla``, PyTorch's SDPA with its own kernel choice (flash attention
where it applies). On a CPU: ``blocked`` and ``xla`` against SDPA, in f32, at a smaller size.

Prints milliseconds per forward+backward, the attention TFLOP/s it implies (causal: half of
``4 * B * N * T * T * D`` forward, 2.5x that with the backward) and each ratio to PyTorch.
Usage: python -m bench.attention [--batch 4 --seq 2048 --repeats 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.timing import median_seconds
from xemogpt_jax.models.attention import AttentionConfig, attention, dot_product_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def ours(impl: str, q, k, v, key_mask) -> Callable[[], object]:
    scale = HEAD_DIM**-0.5
    seq = q.shape[1]

    def loss(q, k, v):
        if impl == "blocked":
            visible = key_mask[:, None, None, :] & jnp.tril(jnp.ones((seq, seq), bool))[None, None]
            out = attention(q, k, v, visible, scale, causal=True)
        else:
            out = dot_product_attention(
                q, k, v, scale=scale, config=AttentionConfig(impl), causal=True, key_mask=key_mask
            )
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(step(q, k, v))


def pytorch(q, k, v, key_mask, device: str) -> Callable[[], object]:
    """SDPA with the same causal-and-padding visibility (GQA through ``enable_gqa``)."""
    qt, kt, vt = (torch.tensor(np.asarray(x, np.float32)).to(device).transpose(1, 2) for x in (q, k, v))
    dtype = torch.bfloat16 if q.dtype == jnp.bfloat16 else torch.float32
    qt, kt, vt = (x.to(dtype).requires_grad_() for x in (qt, kt, vt))
    seq = q.shape[1]
    visible = torch.tensor(np.asarray(key_mask)).to(device)[:, None, None, :]
    visible = visible & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, enable_gqa=True)
        torch.autograd.grad(out.float().sum(), (qt, kt, vt))
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    batch, seq = args.batch or (4 if on_gpu else 1), args.seq or (2048 if on_gpu else 512)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, seq, HEADS, HEAD_DIM)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, seq, KV_HEADS, HEAD_DIM)), dtype) for _ in range(2))
    lengths = np.linspace(seq, seq // 2, batch).astype(int)  # the first row full, the last half padding
    key_mask = jnp.asarray(np.arange(seq)[None] < lengths[:, None])
    flops = 2.5 * 2 * batch * HEADS * seq * seq * HEAD_DIM  # causal forward (half of 4BNTTD) + backward (2x)

    device = "cuda" if on_gpu else "cpu"
    print(f"causal GQA {HEADS}:{KV_HEADS} heads of {HEAD_DIM}, batch {batch} x {seq}, {jnp.dtype(dtype).name}, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on {device}")
    impls = ("cudnn", "xla") if on_gpu else ("blocked", "xla")
    seconds = median_seconds([pytorch(q, k, v, key_mask, device)] + [ours(i, q, k, v, key_mask) for i in impls],
                             args.repeats)
    theirs = 1e3 * seconds[0]
    print(f"  torch sdpa  {theirs:8.2f} ms  {flops / theirs / 1e9:7.1f} TFLOP/s")
    for impl, s in zip(impls, seconds[1:]):
        ms = 1e3 * s
        print(f"  ours {impl:6s} {ms:8.2f} ms  {flops / ms / 1e9:7.1f} TFLOP/s   {theirs / ms:.2f}x torch")


if __name__ == "__main__":
    main()
