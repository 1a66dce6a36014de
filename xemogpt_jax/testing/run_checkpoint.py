"""A random XEmoGPT written the way the trainer writes a stage-3 run, for tests and benchmarks of the inference
commands (``xemogpt-infer --checkpoint`` reads it like any trainer workdir)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx

from xemogpt_jax import checkpoint
from xemogpt_jax.models.xemogpt import XEmoGPT
from xemogpt_jax.run_config import xemogpt_config


def build_model(config: ml_collections.ConfigDict) -> XEmoGPT:
    """The model ``config`` describes, initialised from its seed."""
    return XEmoGPT(xemogpt_config(checkpoint.to_json(config)), rngs=nnx.Rngs(config.seed))


def write_checkpoint(workdir: Path, model: XEmoGPT, config: ml_collections.ConfigDict) -> Path:
    """Every parameter under ``state/model`` at step 1, as the trainer's Checkpointer writes it."""
    saver = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=1, keep=1, keep_best=False,
                                    async_save=False)
    saver.save(1, {"model": nnx.to_pure_dict(nnx.state(model, nnx.Param))}, "{}", checkpoint.to_json(config),
               force=True)
    saver.close()
    return workdir
