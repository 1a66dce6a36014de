"""Keep JAX on the CPU of a host that has libtpu installed but no TPU chip.

With the ``tpu`` extra (libtpu) installed, JAX's first backend use on a machine without a TPU tries the TPU
runtime, logs its failure to stderr and only then falls back to the CPU. That libtpu is there for
``xemogpt-aot --target tpu:<topology>``, which compiles for TPU topologies from a CPU host and needs no
TPU runtime. So, on importing the package, :func:`default_platforms` chooses ``cpu`` explicitly, and
only when all of these hold:

- nobody chose: ``JAX_PLATFORMS`` is unset (and ``jax.config.jax_platforms`` too, if JAX is imported);
- libtpu is installed (without it there is nothing to probe);
- no TPU chip is attached: none of the PCI devices has Google's vendor id, the test JAX's own
  ``cloud_tpu_init`` makes; and ``JAX_FORCE_TPU_INIT`` (JAX's override) is unset;
- no other PJRT plugin (a ``jax_plugins`` package: CUDA, ROCm) is installed, whose GPU ``cpu`` would hide.

A TPU VM, a GPU host and a user who sets ``JAX_PLATFORMS`` get JAX's own choice, untouched.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path

GOOGLE_PCI_VENDOR_ID = "0x1ae0"  # TPU chips (every generation) sit on PCI with Google's vendor id


def tpu_attached() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR_ID:
                return True
        except OSError:
            continue
    return False


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _configured_in_jax() -> bool:
    """An already imported JAX has a platform list (``jax.config.update("jax_platforms", ...)``)."""
    return "jax" in sys.modules and bool(sys.modules["jax"].config.jax_platforms)


def choice() -> str | None:
    """The platform list to set (``"cpu"``), or None to leave JAX's default alone."""
    if os.environ.get("JAX_PLATFORMS") is not None or "JAX_FORCE_TPU_INIT" in os.environ:
        return None
    if _configured_in_jax():
        return None
    if not _installed("libtpu") or _installed("jax_plugins") or tpu_attached():
        return None
    return "cpu"


def default_platforms() -> str | None:
    """Apply :func:`choice` (to the environment, for child processes too, and to an imported JAX)."""
    chosen = choice()
    if chosen is None:
        return None
    os.environ["JAX_PLATFORMS"] = chosen
    if "jax" in sys.modules:  # JAX read the environment at import; its config takes the choice until a backend starts
        sys.modules["jax"].config.update("jax_platforms", chosen)
    return chosen
