"""Stage-3 train step throughput: ours (JAX) vs a PyTorch composition of the same model, at two sizes.

``python -m bench.train [--size {tiny,small,both}] [--steps 10] [--batch-size 4]`` writes a small
synthetic world, takes one real collated stage-3 batch, and times full train steps (forward,
backward, clipping, AdamW) of

- ours: the jitted step of :mod:`xemogpt_jax.trainer` on one device;
- PyTorch: :class:`xemogpt_jax.testing.torch_reference.TorchXEmoGPT` (CLIPVisionModel, HubertModel,
  CLIPEncoderLayer / HubertEncoderLayer bridges, Qwen3ForCausalLM; transformers' default SDPA
  attention) with the same trainable set, the same clipping and AdamW, in eager mode.

Both start from the same random weights (copied from the PyTorch model into ours), so their first
losses must agree; the bench prints both. Sizes:

- ``tiny``: ``configs/sft.py:tiny`` (LLM 64 wide x 2 layers, towers and bridges 32 wide);
- ``small``: the same model with realistic widths, so matmuls dominate as at paper scale: LLM
  512 wide x 8 layers (8 query / 4 KV heads of 64, SwiGLU 1536), CLIP vision and HuBERT towers
  (and the bridges built from them) 256 wide x 2 layers with a 1024 MLP, HuBERT convs 128 wide.

Printed per size: s/step, samples/s and tokens/s (real tokens) of both, their ratio, and our
achieved FLOP/s (XLA cost analysis of the step) as a fraction of this machine's fp32 matmul peak,
measured in the same process as the best of JAX's and PyTorch's best-of-3 square matmuls (2048 and
4096). Numbers, not assertions: nothing here is a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers

from configs import sft
from data_pipelines import synth
from xemogpt_jax import optim, run_config, sharding, stages, trainer
from xemogpt_jax.metrics import compiled_flops
from xemogpt_jax.testing.torch_reference import TorchXEmoGPT, load_into, randomize

SIZES = ("tiny", "small")
TORCH_FIELDS = ("token_ids", "kind", "feature_index", "labels", "attention_mask", "positions")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=(*SIZES, "both"), default="both")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation (after 2 warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--world", default="", help="an existing synthetic world (default: write a small one)")
    return parser.parse_args()


def widen(config: ml_collections.ConfigDict) -> None:
    """The ``small`` size: the tiny model's layout at widths where the matmuls dominate the step."""
    config.model.llm.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64)
    config.model.clip.vision_config.update(hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    config.model.hubert.update(hidden_size=256, intermediate_size=1024, num_attention_heads=4, conv_dim=(128,) * 3)


def stage3_config(world: Path, batch_size: int, size: str) -> ml_collections.ConfigDict:
    config = sft.get_config("tiny")
    if size == "small":
        widen(config)
    config.data.train_dir = str(world / "train")
    config.init_from.tokenizer = str(world / "tokenizer")
    config.data.batch_size = batch_size
    config.data.max_audio_seconds = 2.0
    config.data.length_buckets = (384, 512, 640)
    return config


def time_steps(step: Callable[[], float], count: int) -> tuple[float, float]:
    """(seconds per step after two warm-up steps (compilation, allocator), the first step's loss)."""
    first_loss = step()
    step()
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count, first_loss


def torch_reference(config: ml_collections.ConfigDict, seed: int) -> TorchXEmoGPT:
    """The PyTorch composition of the run config's architecture, random weights, towers frozen."""
    clip = transformers.CLIPVisionConfig(**config.model.clip.vision_config.to_dict())
    hubert = transformers.HubertConfig(**{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in config.model.hubert.to_dict().items()})
    llm = transformers.Qwen3Config(**config.model.llm.to_dict())
    torch.manual_seed(seed)
    reference = TorchXEmoGPT(clip, hubert, llm, num_frames=config.model.num_frames, bridge_layers=config.model.bridge_layers)
    randomize(reference, seed)
    return reference.freeze_towers()


def ours(config: ml_collections.ConfigDict, task: trainer.Task, local: dict, reference: TorchXEmoGPT, steps: int):
    """(s/step, first loss, FLOPs of the compiled step) of our jitted step on one device."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = dataclasses.replace(task, load_pretrained=lambda model, mesh: load_into(model, reference, mesh))
    engine = trainer.build_engine(task, optim.make_optimizer(config.optim, config.train.steps), mesh, config.seed)
    with jax.set_mesh(mesh):
        batch = trainer.global_batch(local, mesh, task.pad_values)
        flops = compiled_flops(engine.step_fn.lower(engine.trained, engine.frozen, batch))

        def step() -> float:
            engine.trained, out = engine.step_fn(engine.trained, engine.frozen, batch)
            return float(out["loss"])

        seconds, first_loss = time_steps(step, steps)
    return seconds, first_loss, flops


def pytorch(config: ml_collections.ConfigDict, local: dict, reference: TorchXEmoGPT, steps: int) -> tuple[float, float]:
    """(s/step, first loss) of eager PyTorch: same trainable set, global-norm clipping and AdamW as ours."""
    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.learning_rate, betas=(config.optim.b1, config.optim.b2),
                                  eps=config.optim.eps, weight_decay=config.optim.weight_decay)
    batch = {k: torch.from_numpy(np.asarray(local[k])).long() for k in TORCH_FIELDS}
    media = dict(frames=torch.from_numpy(np.asarray(local["pixel_values"])),
                 audio=torch.from_numpy(np.asarray(local["input_values"])),
                 audio_mask=torch.from_numpy(np.asarray(local["audio_mask"])).long())
    reference.eval()  # no dropout (ours has none); autograd works the same

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = reference(**batch, **media)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.optim.clip_norm)
        optimizer.step()
        return loss.item()

    return time_steps(step, steps)


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak() -> float:
    """The machine's fp32 matmul FLOP/s: the best of JAX's and PyTorch's square matmuls (printed)."""
    rates = {}
    for n in (2048, 4096):
        a = jnp.ones((n, n), jnp.float32)
        dot = jax.jit(lambda x: x @ x)
        rates[f"JAX {n}"] = 2 * n**3 / best_seconds(lambda: dot(a).block_until_ready())
        t = torch.ones(n, n)
        rates[f"PyTorch {n}"] = 2 * n**3 / best_seconds(lambda: t @ t)
    print("fp32 matmul GFLOP/s (best of 3): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()))
    return max(rates.values())


def describe(config: ml_collections.ConfigDict) -> str:
    llm, vision, hubert = config.model.llm, config.model.clip.vision_config, config.model.hubert
    return (f"LLM {llm.hidden_size} x {llm.num_hidden_layers} layers (MLP {llm.intermediate_size}, vocab "
            f"{llm.vocab_size}), CLIP {vision.hidden_size} x {vision.num_hidden_layers}, HuBERT {hubert.hidden_size} x "
            f"{hubert.num_hidden_layers}, bridges {config.model.bridge_layers} layers each")


def bench_size(size: str, world: Path, batch_size: int, steps: int, peak: float) -> None:
    config = stage3_config(world, batch_size, size)
    task = stages.task_for(config)
    local = next(task.train_data(0, 1))
    tokens = int(np.sum(local["attention_mask"]))
    reference = torch_reference(config, seed=0)
    jax_seconds, jax_loss, flops = ours(config, task, local, reference, steps)
    torch_seconds, torch_loss = pytorch(config, local, reference, steps)
    batch, width = local["token_ids"].shape
    print(f"\nstage-3 train step, {size}: {describe(config)}")
    print(f"batch {batch} x {width} positions ({tokens} real tokens), {jax.devices()[0].platform} x1, "
          f"torch {torch.get_num_threads()} threads")
    print(f"{'':<22}{'s/step':>10}{'samples/s':>12}{'tokens/s':>12}{'first loss':>12}")
    for name, seconds, loss in (("ours (JAX)", jax_seconds, jax_loss), ("PyTorch composition", torch_seconds, torch_loss)):
        print(f"{name:<22}{seconds:>10.4f}{batch / seconds:>12.2f}{tokens / seconds:>12.1f}{loss:>12.4f}")
    print(f"speed ratio ours / PyTorch: {torch_seconds / jax_seconds:.2f}x")
    if flops:
        achieved = flops / jax_seconds
        print(f"our step: {flops / 1e9:.2f} GFLOP (XLA cost analysis) -> {achieved / 1e9:.2f} GFLOP/s = "
              f"{achieved / peak:.3f} of the {peak / 1e9:.1f} GFLOP/s matmul peak")


def main() -> None:
    args = parse_args()
    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    peak = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(args.world) if args.world else Path(tmp) / "world"
        if not args.world:
            synth.write_world(world, num_clips=24, seed=0)
        for size in SIZES if args.size == "both" else (args.size,):
            bench_size(size, world, args.batch_size, args.steps, peak)


if __name__ == "__main__":
    main()
