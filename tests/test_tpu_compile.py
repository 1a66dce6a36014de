"""The tiny stage 1, 2 and 3 train steps with ``model.attention=splash`` compile for a TPU v5e 2x2.

Compiled from this CPU host against ``jax.experimental.topologies`` devices (no TPU needed, libtpu
is): the Pallas splash kernels lower through Mosaic inside ``shard_map`` over a (data 2, fsdp 1,
tensor 2) mesh. Skipped where libtpu is not installed. Each stage compiles in a subprocess, since
the TPU compiler needs its own environment and this process has 8 fake CPU devices.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
MESH = (2, 1, 2)  # data, fsdp, tensor


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
@pytest.mark.parametrize("stage", ["align_video", "align_audio", "sft"])
def test_tiny_step_with_splash_compiles_for_tpu(stage):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # compiling only: share libtpu with other processes
           "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # conftest's fake CPU device count is not for the child
    result = subprocess.run([sys.executable, __file__, stage], capture_output=True, text=True, timeout=900,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    compiled = re.search(rf"compiled {stage} for tpu {TOPOLOGY}: (\d+) Mosaic kernel calls", result.stdout)
    assert compiled and int(compiled.group(1)) > 0, result.stdout[-2000:]
    assert "attention: encoder runs splash" in result.stderr
    if stage == "sft":
        assert "attention: llm runs splash" in result.stderr


def _abstract_batch(stage, config, task_model, mesh, batch=4):
    import jax
    import jax.numpy as jnp

    from xemogpt_jax import aot_check, run_config, sharding
    from xemogpt_jax.models.clip import CLIPConfig

    if stage == "sft":
        return aot_check.abstract_batch(config, task_model, batch, 256, 16_000, mesh)
    text = 16
    shapes = {"text_ids": ((batch, text), jnp.int32), "text_mask": ((batch, text), jnp.int32)}
    if stage == "align_video":
        size = CLIPConfig.from_hf(run_config.architecture(config, "clip")).vision.image_size
        shapes["pixel_values"] = ((batch, config.model.num_frames, size, size, 3), jnp.float32)
    else:
        shapes["input_values"] = ((batch, 16_000), jnp.float32)
        shapes["audio_mask"] = ((batch, 16_000), jnp.int32)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
            for name, (shape, dtype) in shapes.items()}


def compile_stage(stage: str) -> None:
    import logging

    import jax
    from flax import nnx
    from jax.experimental import topologies

    from xemogpt_jax import config_files, optim, run_config, sharding, stages, trainer
    from xemogpt_jax.testing.byte_tokenizer import byte_tokenizer

    logging.basicConfig(level=logging.INFO, force=True)
    stages.load_text_tokenizer = lambda folder: byte_tokenizer()
    stages.qwen3_params.load_tokenizer = lambda folder: byte_tokenizer()
    config = config_files.load(str(ROOT / "configs" / f"{stage}.py:tiny"))
    config.model.attention = "splash"
    config.model.splash_block_q = config.model.splash_block_kv = 128
    devices = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices
    mesh = sharding.make_mesh(MESH, devices=devices)
    task = stages.task_for(config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    abstract = nnx.eval_shape(lambda: trainer.TrainState(task.build_model(nnx.Rngs(0)), tx, task.trainable, 0))
    graphdef, frozen, trained = nnx.split(abstract, trainer.frozen_filter(task.trainable), ...)

    def placed(state):
        def place(variable):
            value = variable.get_value()
            return variable.replace(
                jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding.variable_sharding(variable, mesh))
            )
        return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    step = trainer.make_train_step(graphdef, task.loss, task.trainable, frozen, trained, mesh,
                                   optim.learning_rate_at_step(config.optim, config.train.steps))
    model_config = run_config.xemogpt_config(config, byte_tokenizer()) if stage == "sft" else abstract.model
    batch = _abstract_batch(stage, config, model_config, mesh)
    with jax.set_mesh(mesh):
        lowered = step.lower(placed(trained), placed(frozen), batch)
        lowered.compile()
    kernels = lowered.as_text().count("tpu_custom_call")
    print(f"compiled {stage} for tpu {TOPOLOGY}: {kernels} Mosaic kernel calls")


if __name__ == "__main__":
    compile_stage(sys.argv[1])
