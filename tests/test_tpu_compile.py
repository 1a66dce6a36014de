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


def compile_stage(stage: str) -> None:
    """Compile the stage's tiny step as ``xemogpt-aot`` builds it, with splash attention, and count its kernels."""
    import logging

    import jax

    from xemogpt_jax import aot_check, config_files

    logging.basicConfig(level=logging.INFO, force=True)
    config = config_files.load(str(ROOT / "configs" / f"{stage}.py:tiny"))
    config.model.attention = "splash"
    config.model.splash_block_q = config.model.splash_block_kv = 128
    target = aot_check.parse_target(f"tpu:{TOPOLOGY}")
    mesh = aot_check.make_mesh(target, aot_check.target_devices(target), MESH)
    step = aot_check.build_step(config, mesh, batch_size=4, seq_len=None)
    with jax.set_mesh(mesh):
        lowered = step.lower()
        lowered.compile()
    kernels = lowered.as_text().count("tpu_custom_call")
    print(f"compiled {stage} for tpu {TOPOLOGY}: {kernels} Mosaic kernel calls")


if __name__ == "__main__":
    compile_stage(sys.argv[1])
