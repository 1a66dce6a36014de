"""Stage-3 train step throughput: ours (JAX) vs a PyTorch composition of the same model, at two sizes.

``python -m bench.train [--size {tiny,small,both}] [--steps 10] [--batch-size 4]`` writes a small
synthetic world, takes one real collated stage-3 batch, and times full train steps (forward,
backward, clipping, AdamW) of

- ours: the jitted step of :mod:`xemogpt_jax.trainer` on one device;
- PyTorch: :class:`xemogpt_jax.testing.torch_reference.TorchXEmoGPT` (CLIPVisionModel, HubertModel,
  CLIPEncoderLayer / HubertEncoderLayer bridges, Qwen3ForCausalLM; transformers' default SDPA
  attention) with the same trainable set, the same clipping and AdamW, in eager mode, on 2 threads
  and on 1 (each its own copy of the weights); the speed ratio is against the faster of the two,
  since on a loaded machine every 2-thread op can wait a scheduler slice for its second thread.

Both start from the same random weights (copied from the PyTorch model into ours), so their first
losses must agree; the bench prints both. Sizes:

- ``tiny``: ``configs/sft.py:tiny`` (LLM 64 wide x 2 layers, towers and bridges 32 wide);
- ``small``: the same model with realistic widths, so matmuls dominate as at paper scale: LLM
  512 wide x 8 layers (8 query / 4 KV heads of 64, SwiGLU 1536), CLIP vision and HuBERT towers
  (and the bridges built from them) 256 wide x 2 layers with a 1024 MLP, HuBERT convs 128 wide.

Both sizes run with ``model.unroll_layers`` (the LLM's layer scan unrolled): at 2-8 layers it
compiles quickly and saves the scan's stacked-buffer initialisation and slicing (about 10% of the
small step).

Printed per size: s/step, samples/s and tokens/s (real tokens) of both, their ratio, and our
achieved FLOP/s (the matmul and convolution FLOPs our step executes, counted from its jaxpr as the
training progress bar counts them for MFU) as a fraction of this machine's fp32 matmul
peak, measured in the same process just before and just after the size's steps (the larger counts):
the best of JAX's and PyTorch's best-of-3 square fp32 matmuls (2048 and 4096). The
implementations' timed steps alternate. The same ratio per CPU-second (process CPU time over all
threads, for the step and for the matmul) is printed too: on a shared machine, wall time measures
the share of the cores the process got as much as the code. Load averages are printed beside each size: the
machine may be shared, and a contended PyTorch (OpenMP barriers) slows far more than XLA does.
Numbers, not assertions: nothing here is a test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
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
from xemogpt_jax.metrics import traced_flops
from xemogpt_jax.testing.torch_reference import TorchXEmoGPT, load_into, randomize

SIZES = ("tiny", "small")
PYTORCH_THREADS = (2, 1)  # on a shared machine, 2-thread OpenMP barriers can stall for a scheduler slice per op
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
    run_config.set_architecture(config, "llm", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    vision = run_config.set_architecture(config, "clip").vision_config
    vision.update(hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    run_config.set_architecture(config, "hubert", hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                conv_dim=[128] * 3)


def stage3_config(world: Path, batch_size: int, size: str) -> ml_collections.ConfigDict:
    config = sft.get_config("tiny")
    if size == "small":
        widen(config)
    config.model.unroll_layers = True  # see the module docstring
    config.data.train_dir = str(world / "train")
    config.init_from.tokenizer = str(world / "tokenizer")
    config.data.batch_size = batch_size
    config.data.max_audio_seconds = 2.0
    config.data.length_buckets = (384, 512, 640)
    return config


@dataclasses.dataclass
class Timing:
    """Seconds of one run: wall clock, and this process's CPU time over all its threads."""

    wall: float = 0.0
    cpu: float = 0.0


def timed(run: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def time_interleaved(steps: dict[str, Callable[[], float]], count: int) -> dict[str, tuple[Timing, float]]:
    """Per implementation (mean Timing of a step, first step's loss), the implementations' steps alternating.

    Two warm-up steps each (compilation, allocator) are not timed; alternating the timed steps lets
    all see the same load when the machine is shared.
    """
    first = {name: step() for name, step in steps.items()}
    for step in steps.values():
        step()
    total = {name: Timing() for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            one = timed(step)
            total[name].wall += one.wall / count
            total[name].cpu += one.cpu / count
    return {name: (total[name], first[name]) for name in steps}


def torch_reference(config: ml_collections.ConfigDict, seed: int) -> TorchXEmoGPT:
    """The PyTorch composition of the run config's architecture, random weights, towers frozen."""
    clip = transformers.CLIPVisionConfig(**run_config.architecture(config, "clip")["vision_config"])
    hubert = transformers.HubertConfig(**run_config.architecture(config, "hubert"))
    llm = transformers.Qwen3Config(**run_config.architecture(config, "llm"))
    torch.manual_seed(seed)
    reference = TorchXEmoGPT(
        clip, hubert, llm, num_frames=config.model.num_frames, bridge_layers=config.model.bridge_layers
    )
    randomize(reference, seed)
    return reference.freeze_towers()


def ours(config: ml_collections.ConfigDict, task: trainer.Task, local: dict, reference: TorchXEmoGPT):
    """(step -> loss, FLOPs of the compiled step): our jitted step on one device, as the trainer runs it."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    task = dataclasses.replace(task, load_pretrained=lambda model, mesh: load_into(model, reference, mesh))
    engine = trainer.build_engine(task, optim.make_optimizer(config.optim, config.train.steps), mesh, config.seed)
    with jax.set_mesh(mesh):
        batch = trainer.global_batch(local, mesh, task.pad_values)
        flops = traced_flops(engine.step_fn, engine.trained, engine.frozen, batch)

    def step() -> float:
        with jax.set_mesh(mesh):
            engine.trained, out = engine.step_fn(engine.trained, engine.frozen, batch)
        return float(out["loss"])

    return step, flops


def pytorch(
    config: ml_collections.ConfigDict, local: dict, reference: TorchXEmoGPT, threads: int
) -> Callable[[], float]:
    """Eager PyTorch's step -> loss on ``threads`` threads: same trainable set, clipping and AdamW as ours."""
    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.learning_rate, betas=(config.optim.b1, config.optim.b2),
                                  eps=config.optim.eps, weight_decay=config.optim.weight_decay)
    batch = {k: torch.from_numpy(np.asarray(local[k])).long() for k in TORCH_FIELDS}
    media = dict(frames=torch.from_numpy(np.asarray(local["pixel_values"])),
                 audio=torch.from_numpy(np.asarray(local["input_values"])),
                 audio_mask=torch.from_numpy(np.asarray(local["audio_mask"])).long())
    reference.eval()  # no dropout (ours has none); autograd works the same

    def step() -> float:
        torch.set_num_threads(threads)
        optimizer.zero_grad(set_to_none=True)
        loss = reference(**batch, **media)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.optim.clip_norm)
        optimizer.step()
        return loss.item()

    return step


def matmul_peak(when: str) -> Timing:
    """The machine's fp32 matmul FLOP per wall second and per CPU second (``Timing`` fields hold rates).

    Each is the best over JAX's and PyTorch's best-of-3 square matmuls; measured before and after a
    size's steps, the larger one counting, so a lull in the load cannot flatter the ratio.
    """
    torch.set_num_threads(max(PYTORCH_THREADS))
    rates = {}
    for n in (2048, 4096):
        a, t = jnp.ones((n, n), jnp.float32), torch.ones(n, n)
        dot = jax.jit(lambda x: x @ x)
        for name, run in ((f"JAX {n}", lambda: dot(a).block_until_ready()), (f"PyTorch {n}", lambda: t @ t)):
            run()
            runs = [timed(run) for _ in range(3)]
            rates[name] = Timing(2 * n**3 / min(r.wall for r in runs), 2 * n**3 / min(r.cpu for r in runs))
    print(f"fp32 matmul GFLOP/s {when} (best of 3, wall / CPU-second): "
          + ", ".join(f"{k} {v.wall / 1e9:.1f} / {v.cpu / 1e9:.1f}" for k, v in rates.items()))
    return Timing(max(r.wall for r in rates.values()), max(r.cpu for r in rates.values()))


def describe(config: ml_collections.ConfigDict) -> str:
    llm, hubert = run_config.architecture(config, "llm"), run_config.architecture(config, "hubert")
    vision = run_config.architecture(config, "clip")["vision_config"]
    return (f"LLM {llm['hidden_size']} x {llm['num_hidden_layers']} layers (MLP {llm['intermediate_size']}, vocab "
            f"{llm['vocab_size']}), CLIP {vision['hidden_size']} x {vision['num_hidden_layers']}, HuBERT "
            f"{hubert['hidden_size']} x {hubert['num_hidden_layers']}, "
            f"bridges {config.model.bridge_layers} layers each")


def bench_size(size: str, world: Path, batch_size: int, steps: int) -> None:
    """Build both implementations of one size on the same batch and weights, time them, print the table."""
    config = stage3_config(world, batch_size, size)
    task = stages.task_for(config)
    local = next(task.train_data(0, 1))
    tokens = int(np.sum(local["attention_mask"]))
    reference = torch_reference(config, seed=0)
    print(f"\nstage-3 train step, {size}: {describe(config)}; load average {os.getloadavg()[0]:.1f}")
    ours_step, flops = ours(config, task, local, reference)
    steppers = {"ours (JAX)": ours_step}
    for threads in PYTORCH_THREADS:
        steppers[f"PyTorch, {threads} thread{'s' * (threads > 1)}"] = pytorch(
            config, local, copy.deepcopy(reference), threads
        )
    before = matmul_peak("before")
    results = time_interleaved(steppers, steps)
    after = matmul_peak("after")
    peak = Timing(max(before.wall, after.wall), max(before.cpu, after.cpu))
    batch, width = local["token_ids"].shape
    print(f"batch {batch} x {width} positions ({tokens} real tokens), {jax.devices()[0].platform} x1")
    print(f"{'':<22}{'s/step':>10}{'samples/s':>12}{'tokens/s':>12}{'CPU s/step':>12}{'first loss':>12}")
    for name, (step, loss) in results.items():
        print(f"{name:<22}{step.wall:>10.4f}{batch / step.wall:>12.2f}{tokens / step.wall:>12.1f}"
              f"{step.cpu:>12.3f}{loss:>12.4f}")
    jax_step = results.pop("ours (JAX)")[0]
    torch_seconds = min(step.wall for step, _ in results.values())
    print(f"speed ratio ours / faster PyTorch: {torch_seconds / jax_step.wall:.2f}x "
          f"(load average now {os.getloadavg()[0]:.1f})")
    print(f"our step: {flops / 1e9:.2f} GFLOP (matmuls + convolutions) -> {flops / jax_step.wall / 1e9:.2f} GFLOP/s = "
          f"{flops / jax_step.wall / peak.wall:.3f} of the {peak.wall / 1e9:.1f} GFLOP/s matmul peak; per "
          f"CPU-second {flops / jax_step.cpu / 1e9:.2f} = {flops / jax_step.cpu / peak.cpu:.3f} of the "
          f"matmul's {peak.cpu / 1e9:.1f}")


def main() -> None:
    args = parse_args()
    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(args.world) if args.world else Path(tmp) / "world"
        if not args.world:
            synth.write_world(world, num_clips=24, seed=0)
        for size in SIZES if args.size == "both" else (args.size,):
            bench_size(size, world, args.batch_size, args.steps)


if __name__ == "__main__":
    main()
