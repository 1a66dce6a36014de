"""Tiny NNX models filled from the host for the bridge and XEmoGPT parity tests.

The weight-copy helpers and the byte tokenizer live in :mod:`xemogpt_jax.testing` (the benchmarks use them too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def build_filled(factory: Callable[[], M], seed: int = 0) -> M:
    """Build a model abstractly and fill every variable with host random values (N(0, 0.02)).

    Eager initialisation compiles one small XLA program per parameter shape, which dominates a
    tiny test's time; the parity tests overwrite the values anyway.
    """
    model = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        variable.set_value(jnp.asarray(rng.normal(0.0, 0.02, shape).astype(dtype)))
    return model
