"""The one module that touches Orbax: save, restore and inspect training checkpoints.

A checkpoint step holds four items, written together:

- ``state``: the trainable parameters, the optimizer state, the step counter and the RNG key
  (everything of the train state except frozen weights, which are rebuilt from ``init_from``),
- ``data``: every process's data-iterator state (Grain ``get_state``), as JSON,
- ``config``: the run's config, as JSON,
- metrics (``eval_loss``) in the manager's own metadata, used to keep the best checkpoint.

Restoring takes an abstract target whose leaves carry the CURRENT mesh's shardings, so a
checkpoint written on one mesh shape loads onto any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

STATE, DATA, CONFIG = "state", "data", "config"
EVAL_METRIC = "eval_loss"


def _handlers() -> dict[str, Any]:
    """Handlers for every item, so reading one item does not warn about the others."""
    return {
        STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()
    }


def resolve(directory: str | os.PathLike) -> epath.Path:
    """A local path made absolute (Orbax requires it), or a remote one (``gs://...``) as given."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
    """Saves every ``every_steps``, keeps the latest ``keep`` and the best by eval loss."""

    def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int, keep_best: bool, async_save: bool):
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[EVAL_METRIC],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = resolve(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, CONFIG))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, force: bool = False) -> bool:
        """Whether :meth:`save` would write ``step``: a caller skips building the state when it would not."""
        return force or self.manager.should_save(step)

    def save(
        self,
        step: int,
        state: Any,
        data_state: str,
        config: dict[str, Any],
        *,
        eval_loss: float | None = None,
        force: bool = False,
    ) -> bool:
        """Save if the interval says so (or ``force``); collective across processes. Returns whether it saved.

        ``data_state`` is this process's iterator state; all processes' states are gathered and
        stored together so each process finds its own on restore.
        """
        if not self.due(step, force):
            return False
        metrics = None if eval_loss is None else {EVAL_METRIC: float(eval_loss)}
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: ocp.args.JsonSave(gather_process_strings(data_state)),
                CONFIG: ocp.args.JsonSave(config),
            }
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[int, Any, str | None]:
        """(step, state placed on ``abstract_state``'s shardings, this process's data-iterator state)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}),
        )
        data_states = restored[DATA] or []
        data_state = data_states[jax.process_index()] if jax.process_index() < len(data_states) else None
        return step, restored[STATE], data_state

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_directory(path: str | Path) -> Path:
    """A trainer workdir or its ``checkpoints/`` folder -> the folder the Orbax manager owns."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory")
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _manager(directory: str | Path, state_handler: Any = None) -> ocp.CheckpointManager:
    handlers = _handlers() if state_handler is None else {**_handlers(), STATE: state_handler}
    return ocp.CheckpointManager(resolve(directory), item_handlers=handlers)


def _step(manager: ocp.CheckpointManager, directory: str | Path, step: int | None) -> int:
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint steps in {directory}")
    return step


def steps(directory: str | Path) -> list[int]:
    """The steps saved in ``directory``; empty when it holds no checkpoint (or is not a checkpoint folder)."""
    with _manager(directory) as manager:
        return list(manager.all_steps())


def restore_config(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The config a checkpoint was trained with."""
    with _manager(directory) as manager:
        step = _step(manager, directory, step)
        return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]


def state_metadata(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The ``state`` item's tree of stored shapes and dtypes; no array is read."""
    with _manager(directory) as manager:
        return manager.item_metadata(_step(manager, directory, step))[STATE].tree


def restore_state_part(directory: str | Path, target: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    """Only the leaves of ``target`` (a subtree of the ``state`` item as ShapeDtypeStructs with shardings).

    Each array is read straight into its sharding; what ``target`` leaves out (optimizer moments,
    other modules) is never read.
    """
    with _manager(directory, ocp.PyTreeCheckpointHandler()) as manager:
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        return manager.restore(_step(manager, directory, step), args=ocp.args.Composite(**{STATE: args}))[STATE]


def gather_process_strings(text: str) -> list[str]:
    """Every process's ``text``, in process order (a no-op gather on one process)."""
    if jax.process_count() == 1:
        return [text]
    encoded = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return [bytes(row[: int(n)]).decode() for row, n in zip(gathered, np.ravel(lengths))]


def to_json(config: Any) -> dict[str, Any]:
    """A ConfigDict as a checkpoint stores it: JSON-safe (tuples become lists), local ``init_from`` paths absolute.

    Frozen weights are not checkpointed but re-read from ``init_from`` when the checkpoint is loaded; a
    relative path would then resolve against the loader's working directory and could read other weights.
    """
    stored = json.loads(config.to_json_best_effort())
    sources = stored.get("init_from", {})
    for key, path in sources.items():
        if isinstance(path, str) and path:
            sources[key] = str(resolve(path))
    return stored
