"""Data pipelines: media -> versioned ArrayRecord shards (decode once), Grain pipelines, TFDS builder, synthetic
data."""

from xemogpt_jax import jax_platforms as _jax_platforms  # CPU JAX on a host with libtpu but no TPU

_jax_platforms.default_platforms()
