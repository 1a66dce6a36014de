"""The training loop shared by the three stages: sharded state, one jitted step, checkpoints, logging.

A stage is a :class:`Task` (how to build its model, which variables train, its loss, its data).
The loop is the same for all: the model and optimizer live in one :class:`TrainState` module,
split once into a frozen part (weights that never change; rebuilt from ``init_from`` on restart,
never checkpointed) and a trained part (trainable weights, optimizer state, step, RNG key). The
step is ``jax.jit`` with explicit shardings from the mesh, donating the trained part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import pipelines
from xemogpt_jax import checkpoint as checkpoint_lib
from xemogpt_jax import loading, optim, sharding
from xemogpt_jax import metrics as metrics_lib

Batch = dict[str, Any]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class DataIterator(Protocol):
    """What the loop needs from a data pipeline: this process's batches and a resumable position."""

    def __next__(self) -> Batch: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass
class Task:
    """One training stage.

    ``build_model(rngs)`` must be traceable (it runs under ``nnx.eval_shape`` and ``jax.jit``);
    ``load_pretrained(model, mesh)`` fills imported weights (``init_from``) into the abstract model, each
    placed in its sharding (:mod:`xemogpt_jax.loading`); what it leaves unset is initialised from the seed.
    ``train_data(process_index, process_count)`` yields this process's rows of each GLOBAL batch
    (numpy arrays, leading axis = global batch / process count); ``eval_data`` likewise, restarted
    for every evaluation. ``tokens(batch)`` counts the tokens of a local batch for tokens/s;
    ``pad_values`` names bucketed fields whose width all processes must agree on.
    ``abstract_batch(global_batch_size, length=None)`` is a global batch as ``jax.ShapeDtypeStruct``s, laid
    out by the same collate as ``train_data`` (``length``: stage 3's positions, default ``data.max_context``,
    rounded up to its bucket), for ahead-of-time compilation (:mod:`xemogpt_jax.aot_check`).
    """

    build_model: Callable[[nnx.Rngs], nnx.Module]
    trainable: Any
    loss: LossFn
    train_data: Callable[[int, int], DataIterator]
    eval_data: Callable[[int, int], Iterator[Batch]] | None = None
    load_pretrained: Callable[[nnx.Module, Mesh], None] | None = None
    tokens: Callable[[Batch], int] = lambda batch: int(next(iter(batch.values())).shape[0])
    pad_values: Mapping[str, int | str] | None = None
    abstract_batch: Callable[..., dict[str, Any]] | None = None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before touching any checkpoint."""


class TrainState(nnx.Module):
    """Model, optimizer (state only for ``trainable``) and the run's base RNG key."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, trainable: Any, seed: int):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=trainable)
        self.rng = nnx.Variable(jax.random.key_data(jax.random.key(seed)))


def frozen_filter(trainable: Any) -> Any:
    """Parameters that the optimizer does not update."""
    return nnx.All(nnx.Param, nnx.Not(trainable))


@dataclasses.dataclass
class Engine:
    """The split train state, its shardings and the compiled step, for one mesh."""

    graphdef: nnx.GraphDef
    frozen: nnx.State
    trained: nnx.State
    mesh: Mesh
    step_fn: Any
    eval_fn: Any
    trainable: Any

    def model(self) -> nnx.Module:
        """A live view of the current model (for evaluation and generation)."""
        return nnx.merge(self.graphdef, self.frozen, self.trained).model


def build_engine(
    task: Task,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    learning_rate: optax.Schedule = lambda step: 0.0,
) -> Engine:
    """Build the state abstractly, fill it sharded on ``mesh`` (:mod:`xemogpt_jax.loading`), and jit the step.

    ``learning_rate(step)`` is only reported (the schedule itself lives inside ``tx``).
    """

    def factory() -> TrainState:
        return TrainState(task.build_model(nnx.Rngs(seed)), tx, task.trainable, seed)

    with jax.set_mesh(mesh):
        state = nnx.eval_shape(factory)
        if task.load_pretrained is not None:
            task.load_pretrained(state.model, mesh)
        seeded = loading.init_unset(state, factory, mesh)
    loading.log_seeded([p[1:] for p in seeded if p[0] == "model"], "model", seed)
    graphdef, frozen, trained = nnx.split(state, frozen_filter(task.trainable), ...)
    step_fn = make_train_step(graphdef, task.loss, task.trainable, frozen, trained, mesh, learning_rate)
    return Engine(graphdef, frozen, trained, mesh, step_fn, make_eval_step(graphdef, task, seed), task.trainable)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def make_train_step(
    graphdef: nnx.GraphDef,
    loss: LossFn,
    trainable: Any,
    frozen: nnx.State,
    trained: nnx.State,
    mesh: Mesh,
    learning_rate: optax.Schedule,
) -> Any:
    """``step(trained, frozen, batch) -> (trained, metrics)``, jitted with shardings and donation.

    ``frozen``/``trained`` (concrete or abstract) only provide the shardings.
    """
    frozen_sel = frozen_filter(trainable)

    def step(trained: nnx.State, frozen: nnx.State, batch: Batch) -> tuple[nnx.State, dict[str, jax.Array]]:
        state = nnx.merge(graphdef, frozen, trained)
        step_index = state.optimizer.step[...]
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng[...]), step_index)

        def loss_fn(model: nnx.Module) -> tuple[jax.Array, dict[str, jax.Array]]:
            return loss(model, batch, key)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (value, aux), grads = grad_fn(state.model)
        state.optimizer.update(state.model, grads)
        _, _, new_trained = nnx.split(state, frozen_sel, ...)
        out = {"loss": value, "grad_norm": optax.tree.norm(grads), "learning_rate": learning_rate(step_index), **aux}
        return new_trained, {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}

    trained_sh = sharding.state_shardings(trained, mesh)
    frozen_sh = sharding.state_shardings(frozen, mesh)
    return jax.jit(
        step,
        in_shardings=(trained_sh, frozen_sh, None),
        out_shardings=(trained_sh, replicated(mesh)),
        donate_argnums=0,
    )


def global_batch(local: Batch, mesh: Mesh, pad_values: Mapping[str, int | str] | None = None) -> Batch:
    """Assemble each process's rows into global arrays sharded over (data, fsdp)."""
    return pipelines.make_global_batch({k: np.asarray(v) for k, v in local.items()}, mesh, pad_values)


def abstract_trained(engine: Engine) -> Any:
    """The trained part as ShapeDtypeStructs carrying this mesh's shardings (a restore target)."""
    shardings = sharding.state_shardings(engine.trained, engine.mesh)
    pure = nnx.to_pure_dict(engine.trained)
    pure_shardings = nnx.to_pure_dict(shardings)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, pure_shardings)


def restore_into(engine: Engine, restored: Any) -> None:
    nnx.replace_by_pure_dict(engine.trained, restored)


class PreemptionWatch:
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly.

    With several processes, ``jax.distributed`` already turns SIGTERM into a coordinated
    preemption notice, so every process agrees on the step at which to stop.
    """

    def __init__(self) -> None:
        self.requested = False
        if jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self.previous)


def make_eval_step(graphdef: nnx.GraphDef, task: Task, seed: int) -> Any:
    """``eval_step(trained, frozen, batch) -> loss`` with a fixed key and no update."""

    def eval_step(trained: nnx.State, frozen: nnx.State, batch: Batch) -> jax.Array:
        state = nnx.merge(graphdef, frozen, trained)
        return task.loss(state.model, batch, jax.random.key(seed))[0]

    return jax.jit(eval_step)


def evaluate(engine: Engine, batches: Iterator[Batch], num_batches: int, pad_values: Mapping | None = None) -> float:
    """Mean loss over the first ``num_batches`` eval batches."""
    losses = []
    with jax.set_mesh(engine.mesh):
        for _, local in zip(range(num_batches), batches):
            batch = global_batch(local, engine.mesh, pad_values)
            losses.append(float(engine.eval_fn(engine.trained, engine.frozen, batch)))
    return float(np.mean(losses)) if losses else math.nan


def step_flops(engine: Engine, loss: LossFn, batch: Batch, config: ml_collections.ConfigDict, tokens: int) -> float:
    """The model's FLOPs of one train step, from the traced step or the parameter-count rule
    (``perf.flops_from``). A step that rematerialises is traced again without: MFU counts no recomputation."""
    if config.perf.flops_from == "traced":
        def retrace() -> float:
            step = make_train_step(engine.graphdef, loss, engine.trainable, engine.frozen, engine.trained,
                                   engine.mesh, lambda step: 0.0)
            return metrics_lib.traced_flops(step, engine.trained, engine.frozen, batch)

        return metrics_lib.model_flops(engine.step_fn.trace(engine.trained, engine.frozen, batch).jaxpr, retrace)
    if config.perf.flops_from != "params":
        raise ValueError(f"perf.flops_from must be 'traced' or 'params', got {config.perf.flops_from!r}")
    def count(tree: Any) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

    total = count(nnx.state(engine.model(), nnx.Param))
    trained_params = count(nnx.state(engine.model(), engine.trainable))
    return metrics_lib.step_flops_from_params(total, trained_params, tokens)


def log_directory(workdir: Any) -> Path:
    """Where TensorBoard events and metrics.jsonl go: the workdir, or ``./logs/<name>`` for a remote one."""
    text = str(workdir)
    return Path(text) if "://" not in text else Path("logs") / text.rstrip("/").rsplit("/", 1)[-1]


def run(
    config: ml_collections.ConfigDict, workdir: str | Path, task: Task, mesh: Mesh | None = None
) -> dict[str, float]:
    """Train ``task`` to ``config.train.steps``, resuming from ``workdir`` if it holds a checkpoint.

    The mesh comes from ``config.mesh.shape`` over all devices unless ``mesh`` is given.
    Returns the last logged metrics. Raises :class:`NonFiniteLossError` on a NaN/inf loss (the last
    checkpoint stays as it was). Returns early, after saving, when SIGTERM arrives.
    """
    workdir = checkpoint_lib.resolve(workdir)
    mesh = mesh or sharding.make_mesh(tuple(config.mesh.shape))
    tx = optim.make_optimizer(config.optim, config.train.steps)
    engine = build_engine(task, tx, mesh, config.seed, optim.learning_rate_at_step(config.optim, config.train.steps))
    checkpoints = checkpoint_lib.Checkpointer(
        workdir / "checkpoints",
        every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best,
        async_save=config.checkpoint.async_save,
    )
    data = task.train_data(jax.process_index(), jax.process_count())
    step = 0
    if checkpoints.latest_step() is not None:
        step, restored, data_state = checkpoints.restore(None, abstract_trained(engine))
        restore_into(engine, restored)
        if data_state is not None:
            data.set_state(json.loads(data_state))
        logging.info("resumed from step %d in %s", step, checkpoints.directory)
    config_json = checkpoint_lib.to_json(config)

    local = next(data)
    with jax.set_mesh(mesh):
        batch = global_batch(local, mesh, task.pad_values)
        tokens = task.tokens(local) * jax.process_count()
        flops = step_flops(engine, task.loss, batch, config, tokens)
    writer = metrics_lib.MetricsWriter(
        log_directory(workdir),
        total_steps=config.train.steps,
        initial_step=step,
        flops_per_step=flops,
        peak_flops_per_device=config.perf.peak_flops_per_device,
        show_progress=config.train.show_progress,
    )
    watch = PreemptionWatch()
    record: dict[str, float] = {}
    last_saved = step if checkpoints.latest_step() is not None else None
    try:
        writer.step_seconds()
        while step < config.train.steps:
            with jax.set_mesh(mesh):
                engine.trained, out = engine.step_fn(engine.trained, engine.frozen, batch)
            step += 1
            step_tokens, data_state = tokens, json.dumps(data.get_state())
            if step < config.train.steps:  # read the next batch while the step runs (dispatch is asynchronous)
                local = next(data)
                tokens = task.tokens(local) * jax.process_count()
                with jax.set_mesh(mesh):
                    batch = global_batch(local, mesh, task.pad_values)
            loss = float(out["loss"])
            if not math.isfinite(loss):
                checkpoints.wait()
                where = f"step {last_saved} in {checkpoints.directory}" if last_saved is not None else "none yet"
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; stopping without saving. Last good checkpoint: {where}."
                )
            seconds = writer.step_seconds()
            eval_loss = None
            if task.eval_data is not None and step % config.train.eval_every == 0:
                eval_batches = task.eval_data(jax.process_index(), jax.process_count())
                eval_loss = evaluate(engine, eval_batches, config.train.eval_steps, task.pad_values)
            if step % config.train.log_every == 0 or step == config.train.steps or eval_loss is not None:
                scalars = {k: float(v) for k, v in out.items()}
                if eval_loss is not None:
                    scalars["eval_loss"] = eval_loss
                record = writer.write(step, scalars, tokens=step_tokens, seconds=seconds)
            writer.progress(step, record)
            stop = watch.should_stop(step)
            force = stop or step == config.train.steps
            if checkpoints.due(step, force) and checkpoints.save(
                step, nnx.to_pure_dict(engine.trained), data_state, config_json,
                eval_loss=eval_loss, force=force,
            ):
                last_saved = step
            if stop:
                writer.message(f"SIGTERM: saved step {step} to {checkpoints.directory}; exiting")
                break
    finally:
        watch.close()
        checkpoints.close()
        writer.close()
    return record
