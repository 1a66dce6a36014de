"""LoRA adapters on the LLM's linear layers, as PEFT applies them.

``y = x W + b + (alpha / r) * dropout(x) A B`` with ``A`` Kaiming-uniform and ``B`` zero, so a
fresh adapter leaves the model unchanged. Adapter weights are :class:`LoraParam` (a subclass of
``nnx.Param``): ``nnx.state(model, LoraParam)`` selects exactly the adapters, and an optimizer
built with ``wrt=LoraParam`` trains only them. :func:`merge_lora` folds them into the base kernels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from xemogpt_jax.models.layers import DType, Initializer, Linear, default_init, matmul


class LoraParam(nnx.Param):
    """A LoRA adapter weight (trainable when LoRA is on; everything else stays frozen)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Defaults are the reference's: q, k, v projections, r = alpha = 512, dropout 0.05."""

    rank: int = 512
    alpha: float = 512.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kaiming_uniform_a(fan_in: int) -> Initializer:
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` on A: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LoraLinear(Linear):
    """A :class:`Linear` that may carry a LoRA adapter (``lora_a``/``lora_b`` are ``None`` when it does not)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
        use_bias: bool = True,
        kernel_init: Initializer = default_init,
        dtype: DType = None,
        param_dtype: DType = jnp.float32,
    ):
        super().__init__(
            in_features, out_features, axes=axes, rngs=rngs, use_bias=use_bias,
            kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
        )
        self.lora_scale = None if lora is None else lora.scale
        self.lora_dropout = 0.0 if lora is None else lora.dropout
        if lora is None:
            self.lora_a = None
            self.lora_b = None
            return
        a_init = _kaiming_uniform_a(in_features)
        self.lora_a = LoraParam(
            a_init(rngs.params(), (in_features, lora.rank), param_dtype), logical_axes=(axes[0], "lora_rank")
        )
        self.lora_b = LoraParam(jnp.zeros((lora.rank, out_features), param_dtype), logical_axes=("lora_rank", axes[1]))

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        y = super().__call__(x)
        if self.lora_a is None:
            return y
        h = x.astype(y.dtype)
        if dropout_key is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(h.dtype)
        delta = matmul(matmul(h, self.lora_a[...].astype(y.dtype)), self.lora_b[...].astype(y.dtype))
        return y + delta * jnp.asarray(self.lora_scale, y.dtype)


def make_linear(
    name: str,
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
    lora: LoraConfig | None,
    use_bias: bool,
    dtype: DType,
    param_dtype: DType,
) -> LoraLinear:
    """A projection named ``name``; it gets an adapter when LoRA is on and ``name`` is a target."""
    adapter = lora if lora is not None and name in lora.targets else None
    return LoraLinear(
        in_features, out_features, axes=axes, rngs=rngs, lora=adapter, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype,
    )


def _folded(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    delta = jnp.matmul(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into its base kernel in place and drop the adapters (for inference and export).

    Each fold is jitted with the kernel's own sharding as output, so a sharded (stacked) kernel is
    never gathered onto one device or host.
    """
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoraLinear) and module.lora_a is not None:
            kernel = module.kernel[...]
            fold = jax.jit(_folded, static_argnums=3, out_shardings=kernel.sharding)
            module.kernel[...] = fold(kernel, module.lora_a[...], module.lora_b[...], module.lora_scale)
            module.lora_a = None
            module.lora_b = None
