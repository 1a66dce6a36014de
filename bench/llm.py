"""LLM throughput, ours (JAX) vs transformers (PyTorch) on one device, same ~100M-parameter Qwen3 weights.

Prints forward+backward tokens/s (with the model FLOP/s they imply) and greedy decode tokens/s for both and
their ratios. On a GPU (JAX's default backend) both run there; ``--dtype bfloat16`` keeps f32 weights and
computes in bf16 on both sides (ours: the model's compute dtype; PyTorch: ``torch.autocast``), and
``--attention`` picks our kernel (``auto``: cuDNN on a GPU for bf16; PyTorch uses its default SDPA).
Usage: python bench/llm.py [--batch 4 --seq 256 --decode-batch 4 --prompt 32 --new 64 --repeats 3
                            --dtype float32 --attention auto]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from bench.timing import median_seconds
from xemogpt_jax import loading
from xemogpt_jax.generate import GenerationConfig, generate
from xemogpt_jax.models import qwen3_params
from xemogpt_jax.models.attention import BACKENDS, AttentionConfig
from xemogpt_jax.models.qwen3 import parse_dtype


class Device:
    """Where PyTorch runs to match JAX's default backend, and how it computes in ``dtype``."""

    def __init__(self, jax_backend: str, dtype: str):
        self.torch = "cuda" if jax_backend == "gpu" and torch.cuda.is_available() else "cpu"
        self.dtype = dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.torch, dtype=torch.bfloat16)

    def synchronize(self) -> None:
        if self.torch == "cuda":
            torch.cuda.synchronize()


def hf_config() -> transformers.Qwen3Config:
    """~100M parameters: 12 layers of width 768, GQA 12:4, tied 32k vocabulary."""
    return transformers.Qwen3Config(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def train_flops_per_token(config: transformers.Qwen3Config, params: int, seq: int) -> float:
    """Model FLOPs of one forward+backward per token: 6 per parameter, plus causal attention's score and
    value products (half of the full ``12 * layers * seq * heads * head_dim``)."""
    return 6 * params + 6 * config.num_hidden_layers * seq * config.num_attention_heads * config.head_dim


def bench_train(hf_model, model, ids: np.ndarray, repeats: int, device: Device) -> tuple[float, float]:
    tokens = ids.size
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_and_grads(state, ids):
        def loss_fn(state):
            logits = nnx.merge(graphdef, state)(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        return jax.value_and_grad(loss_fn)(state)

    ids_jax = jnp.asarray(ids)
    hf_model.train()
    ids_torch = torch.tensor(ids, dtype=torch.long, device=device.torch)

    def torch_step():
        hf_model.zero_grad(set_to_none=True)
        with device.autocast():
            loss = hf_model(input_ids=ids_torch, labels=ids_torch).loss
        loss.backward()
        device.synchronize()

    ours, theirs = median_seconds([lambda: jax.block_until_ready(loss_and_grads(state, ids_jax)), torch_step],
                                  repeats)
    hf_model.eval()
    return tokens / ours, tokens / theirs


def bench_decode(hf_model, model, ids: np.ndarray, new: int, repeats: int, device: Device) -> tuple[float, float, bool]:
    tokens = ids.shape[0] * new
    config = GenerationConfig(max_new_tokens=new, eos_token_id=(), pad_token_id=0)
    ids_jax = jnp.asarray(ids)
    ours_out = np.asarray(generate(model, ids_jax, config=config).tokens)
    ids_torch = torch.tensor(ids, dtype=torch.long, device=device.torch)

    def hf_generate():
        with torch.no_grad(), device.autocast():
            out = hf_model.generate(
                input_ids=ids_torch, attention_mask=torch.ones_like(ids_torch), max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=0,
            )
        device.synchronize()
        return out

    theirs_out = hf_generate()[:, ids.shape[1]:].cpu().numpy()
    ours, theirs = median_seconds(
        [lambda: jax.block_until_ready(generate(model, ids_jax, config=config).tokens), hf_generate], repeats
    )
    return tokens / ours, tokens / theirs, bool(np.array_equal(ours_out, theirs_out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attention", choices=BACKENDS, default="auto")
    args = parser.parse_args()
    device = Device(jax.default_backend(), args.dtype)

    torch.manual_seed(0)
    hf_model = transformers.Qwen3ForCausalLM(hf_config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        factory = qwen3_params.hf_factory(tmp, dtype=parse_dtype(args.dtype), attention=AttentionConfig(args.attention))
        model, _ = loading.from_hf(factory, tmp, qwen3_params.hf_key_map)
    hf_model.to(device.torch)
    params = sum(p.numel() for p in hf_model.parameters())
    rng = np.random.default_rng(0)
    print(f"config: Qwen3 {params / 1e6:.1f}M params, f32 weights, {args.dtype} compute, attention "
          f"{AttentionConfig(args.attention).resolved(parse_dtype(args.dtype))}, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, torch {torch.__version__} on {device.torch} "
          f"({hf_model.config._attn_implementation}, {torch.get_num_threads()} threads)")

    train_ids = rng.integers(3, 32000, size=(args.batch, args.seq))
    ours, theirs = bench_train(hf_model, model, train_ids, args.repeats, device)
    flops_per_token = train_flops_per_token(hf_model.config, params, args.seq)
    print(f"forward+backward  batch {args.batch}x{args.seq}: ours {ours:8.0f} tok/s "
          f"({ours * flops_per_token / 1e12:.1f} TFLOP/s)   transformers {theirs:8.0f} tok/s "
          f"({theirs * flops_per_token / 1e12:.1f} TFLOP/s)   ratio {ours / theirs:.2f}x")

    prompt_ids = rng.integers(3, 32000, size=(args.decode_batch, args.prompt))
    ours, theirs, same = bench_decode(hf_model, model, prompt_ids, args.new, args.repeats, device)
    print(f"greedy decode  batch {args.decode_batch}, prompt {args.prompt}, {args.new} new: ours {ours:8.0f} tok/s"
          f"   transformers {theirs:8.0f} tok/s   ratio {ours / theirs:.2f}x   tokens identical: {same}")


if __name__ == "__main__":
    main()
