"""Test session setup: 8 host CPU devices so every sharded code path runs, and no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices() -> list[jax.Device]:
    devices = jax.devices()
    assert len(devices) == 8, "conftest must force 8 host CPU devices"
    return devices
