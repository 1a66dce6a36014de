"""Test session setup: 8 host CPU devices so every sharded code path runs (never a TPU), and no network."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite runs on host CPUs, on a TPU VM too and with libtpu installed (the tpu extra), where JAX would
# otherwise probe for a TPU; subprocesses inherit it. TPU compiles (test_aot_tpu.py) need no TPU backend.
# XEMOGPT_TEST_PLATFORMS=cuda,cpu runs the single-device tests on a GPU (the 8 CPU devices stay for the rest).
os.environ["JAX_PLATFORMS"] = os.environ.get("XEMOGPT_TEST_PLATFORMS", "cpu")
# The suite's models are tiny, so its time goes to XLA:CPU compiles, not to running them: LLVM's lowest
# optimisation level compiles a third faster (numerics are the same: no fast-math either way). Subprocesses
# (the console commands under test) inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# Tests and the commands they start compile many identical programs (a resumed run, a restarted server, the
# same tiny step in several files): one compilation cache for all of them, shared by the xdist workers.
CACHE = Path(tempfile.gettempdir()) / f"xemogpt-jax-tests-{os.getuid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))  # least recently used entries go first

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices() -> list[jax.Device]:
    devices = jax.devices("cpu")
    assert len(devices) == 8, "conftest must force 8 host CPU devices"
    return devices
