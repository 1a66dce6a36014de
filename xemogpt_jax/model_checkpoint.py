"""Model-only checkpoints: every XEmoGPT parameter plus the :class:`ModelSpec` that rebuilds the model.

Written by ``tools/import_weights.py``; read through :mod:`xemogpt_jax.loading` by
``tools/export_pytorch.py``, the trainer's ``init_from.model`` and ``infer --checkpoint``. It is an
ordinary trainer checkpoint (:class:`checkpoint.Checkpointer`, step 0) whose ``state`` item is
``{"model": params}`` and whose ``config`` item is the spec's JSON, so Orbax stays behind ``checkpoint.py``.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from xemogpt_jax import checkpoint
from xemogpt_jax.models.xemogpt import XEmoGPT
from xemogpt_jax.models.xemogpt_params import ModelSpec

MODEL = "model"


def _checkpointer(directory: str | Path) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(directory, every_steps=1, keep=1, keep_best=False, async_save=False)


def save_model(directory: str | Path, model: XEmoGPT, spec: ModelSpec) -> None:
    """Write every parameter of ``model`` (sharded arrays are written by their owners) and ``spec``."""
    saver = _checkpointer(directory)
    try:
        saver.save(0, {MODEL: nnx.to_pure_dict(nnx.state(model, nnx.Param))}, "", spec.to_json(), force=True)
    finally:
        saver.close()
