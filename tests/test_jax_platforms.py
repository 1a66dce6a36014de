"""With libtpu installed (the tpu extra) and no TPU chip, the package keeps JAX quietly on the CPU."""

import os
import subprocess
import sys

import pytest

from xemogpt_jax import jax_platforms


def test_a_host_without_tpu_starts_cpu_jax_without_libtpu_noise():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
    code = "import xemogpt_jax, jax; print(jax.devices()[0].platform, jax.config.jax_platforms)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    if jax_platforms.tpu_attached():
        pytest.skip("this host has a TPU chip: JAX's own choice applies")
    assert result.stdout.split()[0] == "cpu"
    assert "libtpu" not in result.stderr and "TPU" not in result.stderr, result.stderr[-2000:]


def test_an_explicit_choice_or_a_tpu_or_no_libtpu_is_left_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert jax_platforms.choice() is None
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(jax_platforms, "_configured_in_jax", lambda: False)  # conftest chose cpu
    monkeypatch.setattr(jax_platforms, "_installed", lambda module: module == "libtpu")
    monkeypatch.setattr(jax_platforms, "tpu_attached", lambda: False)
    assert jax_platforms.choice() == "cpu"
    monkeypatch.setattr(jax_platforms, "tpu_attached", lambda: True)
    assert jax_platforms.choice() is None
    monkeypatch.setattr(jax_platforms, "tpu_attached", lambda: False)
    monkeypatch.setattr(jax_platforms, "_installed", lambda module: False)
    assert jax_platforms.choice() is None
    monkeypatch.setattr(jax_platforms, "_installed", lambda module: True)  # a GPU plugin (jax_plugins) too
    assert jax_platforms.choice() is None
