"""Model-only checkpoints: every XEmoGPT parameter plus the :class:`ModelSpec` that rebuilds the model.

Written by ``tools/import_weights.py``; read by ``tools/export_pytorch.py``, the trainer's
``init_from.model`` (:func:`copy_weights`) and ``infer --checkpoint``. It is an ordinary trainer checkpoint
(:class:`checkpoint.Checkpointer`, step 0) whose ``state`` item is ``{"model": params}`` and whose
``config`` item is the spec's JSON, so Orbax stays behind ``checkpoint.py``.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from xemogpt_jax import checkpoint, run_config, sharding
from xemogpt_jax.models import lora as lora_lib
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


def restore_model(directory: str | Path, mesh: Mesh, step: int | None = None) -> tuple[XEmoGPT, ModelSpec]:
    """The model of a model checkpoint, each parameter restored straight into its sharding on ``mesh``."""
    spec = ModelSpec.from_json(checkpoint.restore_config(directory, step))
    config = run_config.xemogpt_config(spec.run_config())
    model = nnx.eval_shape(lambda: XEmoGPT(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    shardings = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(params), shardings
    )
    reader = _checkpointer(directory)
    try:
        _, restored, _ = reader.restore(step, {MODEL: target})
    finally:
        reader.close()
    nnx.replace_by_pure_dict(params, restored[MODEL])
    nnx.update(model, params)
    return model, spec


def copy_weights(target: XEmoGPT, directory: str | Path, mesh: Mesh) -> None:
    """Every weight of a model checkpoint into ``target``, except ``target``'s own LoRA adapters.

    Adapters the checkpoint carries are folded into their base kernels first, so the imported model's
    function is kept whatever LoRA (or none) the run trains on top. Shapes must agree.
    """
    source, _ = restore_model(directory, mesh)
    lora_lib.merge_lora(source)
    values = nnx.to_pure_dict(nnx.state(source, nnx.Param))
    state = nnx.state(target, nnx.All(nnx.Param, nnx.Not(lora_lib.LoraParam)))
    wanted = nnx.to_pure_dict(state)
    if jax.tree.structure(values) != jax.tree.structure(wanted):
        raise ValueError(f"model checkpoint {directory} holds other parameters than the run's model")
    mismatched = [
        f"{jax.tree_util.keystr(path)}: checkpoint {got.shape}, model {want.shape}"
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(values), jax.tree.leaves(wanted))
        if got.shape != want.shape
    ]
    if mismatched:
        raise ValueError(f"model checkpoint {directory} does not fit the run's model: {mismatched[:8]}")
    nnx.replace_by_pure_dict(state, values)
    nnx.update(target, state)
