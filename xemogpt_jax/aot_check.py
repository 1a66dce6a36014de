"""Compile a stage's train step ahead of time on fake CPU devices, without allocating any weight.

``xemogpt-aot --config configs/sft.py --mesh 2,4`` (or ``python tools/aot_check.py ...``) builds the
paper-scale stage-3 train state abstractly (``nnx.eval_shape``), gives every leaf the sharding of the (data, fsdp,
tensor) mesh, lowers and compiles the jitted step for ShapeDtypeStruct inputs, and prints XLA's
per-device memory estimate and FLOPs. It answers "does this fit, and how is it laid out" before
a single accelerator hour is spent. ``--mesh`` takes 2 or 3 entries (tensor defaults to 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from types import SimpleNamespace

from xemogpt_jax import cli_checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sft.py", help="stage config file, optionally with :variant")
    parser.add_argument("--mesh", default="2,4", help="data,fsdp[,tensor]")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence bucket (default: max_context)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--audio-seconds", type=float, default=None, help="audio input length (default: the config's)")
    return parser.parse_args(argv)


def abstract_batch(config, model_config, batch: int, length: int, audio_samples: int, mesh):
    import jax
    import jax.numpy as jnp

    from xemogpt_jax import sharding

    size = model_config.vision.image_size
    shapes = {
        "token_ids": ((batch, length), jnp.int32),
        "kind": ((batch, length), jnp.int32),
        "feature_index": ((batch, length), jnp.int32),
        "labels": ((batch, length), jnp.int32),
        "attention_mask": ((batch, length), jnp.int32),
        "positions": ((batch, length), jnp.int32),
        "pixel_values": ((batch, model_config.num_frames, size, size, 3), jnp.float32),
        "input_values": ((batch, audio_samples), jnp.float32),
        "audio_mask": ((batch, audio_samples), jnp.int32),
    }
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
        for name, (shape, dtype) in shapes.items()
    }


def gib(n: float) -> str:
    return f"{n / 2**30:9.3f} GiB"


def check_args(args: argparse.Namespace) -> None:
    """A loadable stage-3 config and a usable mesh, before JAX is configured."""
    problems = cli_checks.Problems()
    config = problems.config("--config", args.config)
    if config is not None and config.get("stage") != "sft":
        problems.add("--config", f"{args.config} is stage {config.get('stage')!r}; aot_check compiles the stage-3 "
                                 "(sft) step")
    mesh = args.mesh.split(",")
    if not (2 <= len(mesh) <= 3 and all(s.isdigit() and int(s) > 0 for s in mesh)):
        problems.add("--mesh", f"{args.mesh!r}: expected 2 or 3 positive sizes, data,fsdp[,tensor]")
    problems.raise_if_any()


@cli_checks.command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    mesh_shape = tuple(int(s) for s in args.mesh.split(","))
    mesh_shape = mesh_shape + (1,) * (3 - len(mesh_shape))
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape))
    from flax import nnx

    from xemogpt_jax import config_files, metrics, optim, run_config, sharding, stages, trainer
    from xemogpt_jax.models.xemogpt import XEmoGPT

    config = config_files.load(args.config)
    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=0)  # only ids are read; no tokenizer files needed
    model_config = run_config.xemogpt_config(config, tokenizer)
    trainable = stages.sft_trainable(config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    mesh = sharding.make_mesh(mesh_shape)

    def factory() -> trainer.TrainState:
        return trainer.TrainState(XEmoGPT(model_config, rngs=nnx.Rngs(0)), tx, trainable, config.seed)

    abstract = nnx.eval_shape(factory)
    graphdef, frozen, trained = nnx.split(abstract, trainer.frozen_filter(trainable), ...)

    def with_shardings(state):
        def place(variable):
            value = variable.get_value()
            placed = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding.variable_sharding(variable, mesh))
            return variable.replace(placed)

        return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    frozen_in, trained_in = with_shardings(frozen), with_shardings(trained)
    step = trainer.make_train_step(
        graphdef, stages.sft_loss, trainable, frozen, trained, mesh,
        optim.learning_rate_at_step(config.optim, config.train.steps),
    )
    batch_size = args.batch_size or config.data.batch_size
    length = args.seq_len or config.data.max_context
    seconds = args.audio_seconds or config.data.max_audio_seconds
    batch = abstract_batch(config, model_config, batch_size, length, int(seconds * 16_000), mesh)

    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    print(f"config {args.config}: mesh (data, fsdp, tensor) = {mesh_shape}, batch {batch_size} x {length} tokens, "
          f"{seconds:g} s audio, compute dtype {config.dtype}")
    print(f"parameters: {count(nnx.state(abstract.model, nnx.Param)) / 1e9:.3f} B total, "
          f"{count(nnx.state(abstract.model, trainable)) / 1e6:.1f} M trainable; "
          f"optimizer + trained state {count(trained) / 1e6:.1f} M values")
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(trained_in, frozen_in, batch)
        compiled = lowered.compile()
    print(f"lowered and compiled in {time.perf_counter() - start:.1f} s")
    memory = compiled.memory_analysis()
    if memory is None:
        print("this backend gives no memory analysis")
        return 0
    arguments = memory.argument_size_in_bytes
    outputs = memory.output_size_in_bytes
    aliased = memory.alias_size_in_bytes
    temps = memory.temp_size_in_bytes
    print("per-device memory (XLA estimate):")
    print(f"  arguments (state + batch) {gib(arguments)}")
    print(f"  outputs                   {gib(outputs)}  ({gib(aliased).strip()} aliased to donated inputs)")
    print(f"  temporaries               {gib(temps)}")
    print(f"  peak ~ args + outputs - aliased + temps = {gib(arguments + outputs - aliased + temps).strip()}")
    with jax.set_mesh(mesh):
        flops = metrics.traced_flops(step, trained_in, frozen_in, batch)
    devices = math.prod(mesh_shape)
    print(f"step FLOPs (matmuls and convolutions, every layer counted): {flops / 1e12:.1f} TFLOP, "
          f"{flops / devices / 1e12:.1f} TFLOP per device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
