"""XEmoGPT in JAX/Flax NNX.

Importing the package keeps JAX on the CPU of a host that has libtpu (the ``tpu`` extra) but no TPU chip,
without libtpu's start-up probe and its stderr noise: see :mod:`xemogpt_jax.jax_platforms`.
"""

from xemogpt_jax import jax_platforms as _jax_platforms

_jax_platforms.default_platforms()
