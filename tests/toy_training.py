"""A stand-in training task for the trainer tests, and a CLI that runs it (for subprocess tests).

The toy model has a frozen layer, trainable layers, a norm, a positional-style table and a learnable
log-scale, its loss mixes global-batch InfoNCE with MSE and RNG noise, and its data is a Grain
pipeline with a resumable iterator: every piece the trainer must shard, checkpoint and resume.

CLI: ``python tests/toy_training.py --workdir DIR --steps N [--devices 8] [--mesh 2,2,2]
[--processes P --process-id I --coordinator HOST:PORT] [--nan-at K]``; writes ``final_params.npz``
(the trainable parameters of the last checkpoint) to DIR; per-step losses are in DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from configs import common
from xemogpt_jax import losses, trainer
from xemogpt_jax.models.layers import LayerNorm, Linear, param

IN, WIDTH = 8, 16
NUM_EXAMPLES = 512


class ToyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.frozen_encoder = Linear(IN, WIDTH, axes=("embed", "mlp"), rngs=rngs)
        self.position_table = param(rngs, nnx.initializers.normal(0.02), (4, WIDTH), ("frames", "mlp"))
        self.norm = LayerNorm(WIDTH)
        self.hidden = Linear(WIDTH, WIDTH, axes=("mlp", "embed"), rngs=rngs)
        self.out = Linear(WIDTH, WIDTH, axes=("embed", "mlp"), rngs=rngs)
        self.logit_scale = nnx.Param(losses.init_logit_scale(0.5))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.frozen_encoder(x))
        h = h + self.position_table[...].mean(0)
        return self.out(jax.nn.gelu(self.hidden(self.norm(h))))


TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("frozen_encoder")))


def toy_loss(model: ToyModel, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    pred = model(batch["x"])
    pred = pred + 0.01 * jax.random.normal(key, pred.shape)
    contrastive = losses.info_nce(pred, batch["y"], model.logit_scale[...])
    mse = jnp.mean(jnp.square(pred - batch["y"]))
    return contrastive + mse, {"mse": mse}


def example(index: int, nan_at_example: int | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    x = rng.normal(size=IN).astype(np.float32)
    mixing = np.random.default_rng(12345).normal(size=(IN, WIDTH)).astype(np.float32)
    y = np.tanh(x @ mixing).astype(np.float32)
    if nan_at_example is not None and index == nan_at_example:
        x[0] = np.nan
    return {"x": x, "y": y}


def toy_data(global_batch: int, process_index: int, process_count: int, seed: int, nan_at_step: int | None = None):
    """This process's rows of each global batch; step ``nan_at_step`` (1-based) carries a NaN."""
    local = global_batch // process_count
    order = grain.MapDataset.range(NUM_EXAMPLES).shuffle(seed=seed).repeat()
    batches = order.batch(global_batch)
    if nan_at_step is None:
        poisoned = None
    else:
        poisoned = int(np.asarray(batches[nan_at_step - 1])[0])

    def rows(indices: np.ndarray) -> dict[str, np.ndarray]:
        mine = np.asarray(indices)[process_index * local : (process_index + 1) * local]
        items = [example(int(i), poisoned) for i in mine]
        return {k: np.stack([item[k] for item in items]) for k in items[0]}

    return iter(batches.map(rows).to_iter_dataset())


def toy_task(config: ml_collections.ConfigDict, nan_at_step: int | None = None) -> trainer.Task:
    return trainer.Task(
        build_model=ToyModel,
        trainable=TRAINABLE,
        loss=toy_loss,
        train_data=lambda p, n: toy_data(config.data.batch_size, p, n, config.data.shuffle_seed, nan_at_step),
        eval_data=lambda p, n: toy_data(config.data.eval_batch_size, p, n, config.data.shuffle_seed + 1),
    )


def toy_config(
    steps: int, mesh: tuple[int, int, int] = (-1, 1, 1), every: int = 2, evaluate: bool = True
) -> ml_collections.ConfigDict:
    """Checkpoint every ``every`` steps (and evaluate then, if ``evaluate``)."""
    c = common.base_config("toy")
    common.tiny_overrides(c)
    c.mesh.shape = mesh
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.optim.learning_rate = 1e-2
    c.optim.warmup_steps = 2
    c.train.steps = steps
    c.train.log_every = 1
    c.train.eval_every = every if evaluate else 10**9
    c.train.eval_steps = 1
    c.train.show_progress = False
    c.perf.flops_from = "params"
    c.checkpoint.every_steps = every
    c.checkpoint.keep = 2
    return c


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """Flat ``path -> host array`` of a state."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
    return {path: np.asarray(jax.device_get(value)) for path, value in flat.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--mesh", default="-1,1,1")
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--nan-at", type=int, default=None)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--coordinator", default="")
    args = parser.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.devices)
    jax.config.update("jax_default_matmul_precision", "highest")
    if args.processes > 1:
        jax.distributed.initialize(args.coordinator, args.processes, args.process_id)
    config = toy_config(args.steps, tuple(int(s) for s in args.mesh.split(",")), args.every, not args.no_eval)
    workdir = Path(args.workdir)
    try:
        trainer.run(config, workdir, toy_task(config, args.nan_at))
    except trainer.NonFiniteLossError as error:
        print(f"NonFiniteLossError: {error}", flush=True)
        sys.exit(3)
    final = load_final(config, workdir)  # collective: every process takes part
    if jax.process_index() == 0:
        np.savez(workdir / "final_params.npz", **final)


def load_final(config: ml_collections.ConfigDict, workdir: Path, mesh=None) -> dict[str, np.ndarray]:
    """The trainable parameters of the latest checkpoint, restored onto ``mesh`` (default: the config's)."""
    from xemogpt_jax import checkpoint, optim, sharding

    mesh = mesh or sharding.make_mesh(tuple(config.mesh.shape))
    engine = trainer.build_engine(toy_task(config), optim.make_optimizer(config.optim, config.train.steps), mesh, 0)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=1, keep=2, keep_best=False, async_save=False)
    _, restored, _ = ckpt.restore(None, trainer.abstract_trained(engine))
    ckpt.close()
    trainer.restore_into(engine, restored)
    return flat_arrays(nnx.state(engine.model(), TRAINABLE))


if __name__ == "__main__":
    main()
