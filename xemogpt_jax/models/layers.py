"""Building blocks shared by every model family, each parameter tagged with logical axes.

Kernels are stored (in, out), the transpose of a PyTorch ``Linear.weight``; the HF key
mappings beside each model do the transposition. Parameters live in ``param_dtype``
(fp32 by default) and are cast to the compute ``dtype`` at use, which gives bf16 compute
with fp32 master weights when ``dtype=jnp.bfloat16``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from xemogpt_jax.models.attention import AttentionConfig, dot_product_attention

Initializer = Callable[..., jax.Array]
DType = jnp.dtype | type | None

default_init = nnx.initializers.normal(stddev=0.02)


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: DType = jnp.float32,
) -> nnx.Param:
    """A parameter with its logical axis names; ``rngs=None`` for deterministic inits (zeros/ones)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` with the leading axes merged into one first.

    The kernel's gradient then contracts a single token axis. Left ``[B, T, in]``, it contracts
    (batch, length) jointly, which XLA's CPU backend lowers through element-by-element transposing
    copies of the activations (18% of a 512-wide stage-3 step on 2 cores); merged, one plain matmul.
    """
    out = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with a (in, out) kernel."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_init: Initializer = default_init,
        dtype: DType = None,
        param_dtype: DType = jnp.float32,
    ):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = param(None, nnx.initializers.zeros, (out_features,), axes[1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in fp32 (as PyTorch does for fp32 inputs)."""

    def __init__(self, features: int, *, eps: float = 1e-5, use_bias: bool = True, param_dtype: DType = jnp.float32):
        self.scale = param(None, nnx.initializers.ones, (features,), ("norm",), param_dtype)
        self.bias = param(None, nnx.initializers.zeros, (features,), ("norm",), param_dtype) if use_bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in Qwen/LLaMA: normalise in fp32, cast back, then scale."""

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype: DType = jnp.float32):
        self.scale = param(None, nnx.initializers.ones, (features,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Embed(nnx.Module):
    """A token (or position) table."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        axes: tuple[str | None, str | None] = ("vocab", "embed"),
        embedding_init: Initializer = default_init,
        param_dtype: DType = jnp.float32,
    ):
        self.embedding = param(rngs, embedding_init, (num_embeddings, features), axes, param_dtype)

    def __call__(self, ids: jax.Array, dtype: DType = None) -> jax.Array:
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0).astype(dtype or table.dtype)


# ``model.remat`` / ``model.remat_towers``: what a rematerialised layer keeps for the backward pass.
QKV_PROJ = "qkv_proj"  # the checkpoint name of the attention input projections (q, k, v)
_REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(QKV_PROJ),
    # the other argument-free jax.checkpoint_policies, by their own names
    **{name: getattr(jax.checkpoint_policies, name) for name in (
        "everything_saveable", "nothing_saveable", "checkpoint_dots", "checkpoint_dots_with_no_batch_dims",
    )},
}
REMAT_CHOICES = tuple(_REMAT_POLICIES)


def remat_name(value: str | bool | None) -> str:
    """A remat setting normalised: the old boolean reads True = ``full``, False/None = ``none``."""
    if value is None or isinstance(value, bool):
        return "full" if value else "none"
    if value not in _REMAT_POLICIES:
        raise ValueError(f"remat={value!r}; expected one of {REMAT_CHOICES} (or a boolean)")
    return value


_REMAT_OFF = contextvars.ContextVar("remat_off", default=False)


@contextlib.contextmanager
def remat_off() -> Iterator[None]:
    """Trace every layer without remat, whatever its setting: the FLOPs the model needs, each forward once, which
    MFU counts (remat's recomputation is hardware work, not model work). Trace a freshly made ``jit`` under it:
    a jitted function keeps the traces it made."""
    token = _REMAT_OFF.set(True)
    try:
        yield
    finally:
        _REMAT_OFF.reset(token)


def remat_policy(value: str | bool | None) -> tuple[bool, Callable | None]:
    """``(rematerialise?, jax.checkpoint policy)`` for a remat setting (never, under :func:`remat_off`)."""
    name = remat_name(value)
    return name != "none" and not _REMAT_OFF.get(), _REMAT_POLICIES[name]


def call_layer(layer: nnx.Module, remat: str | bool | None, *args: jax.Array) -> jax.Array:
    """``layer(*args)``, rematerialised in the backward pass with the policy ``remat`` names."""
    enabled, policy = remat_policy(remat)
    if not enabled:
        return layer(*args)
    return nnx.remat(lambda module, *xs: module(*xs), policy=policy, prevent_cse=False)(layer, *args)


def key_mask_bias(mask: jax.Array) -> jax.Array:
    """Additive attention bias ``[B, 1, 1, T]`` from a ``[B, T]`` valid-key mask (HF's min-value fill)."""
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention, the one used by the CLIP, HuBERT and BERT encoders.

    Takes an additive bias broadcastable to ``[B, heads, Tq, Tk]`` whose entries are 0 (attend) or
    the fp32 minimum (mask), as :func:`key_mask_bias` and CLIP's ``causal_bias`` make. ``attention``
    picks the backend (:class:`~xemogpt_jax.models.attention.AttentionConfig`); ``blocked`` (CPU's
    ``auto``) is the einsum below, scores and softmax in fp32 whatever the compute dtype, as HF's eager
    attention does. The other backends read the bias as a boolean mask; splash reads a ``[B, 1, 1, Tk]``
    bias as key padding and a ``[B, 1, Tq, Tk]`` one as causal with key padding (its last row).
    """

    def __init__(
        self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype: DType = None, param_dtype: DType = jnp.float32,
        attention: AttentionConfig | None = None,
    ):
        kwargs = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(width, width, axes=("embed", "heads"), **kwargs)
        self.k_proj = Linear(width, width, axes=("embed", "heads"), **kwargs)
        self.v_proj = Linear(width, width, axes=("embed", "heads"), **kwargs)
        self.out_proj = Linear(width, width, axes=("heads", "embed"), **kwargs)
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.attention = attention or AttentionConfig()

    def __call__(self, x: jax.Array, attention_bias: jax.Array | None = None) -> jax.Array:
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (checkpoint_name(proj(x), QKV_PROJ).reshape(heads) for proj in projections)
        if self.attention.resolved() != "blocked":
            mask = None if attention_bias is None else attention_bias > 0.5 * jnp.finfo(jnp.float32).min
            key_mask = None if mask is None else mask[:, 0, -1, :]
            if key_mask is not None and key_mask.shape[0] != x.shape[0]:
                key_mask = jnp.broadcast_to(key_mask, (x.shape[0], key_mask.shape[1]))
            out = dot_product_attention(
                q, k, v, scale=self.head_dim**-0.5, config=self.attention, mask=mask, key_mask=key_mask,
                causal=mask is not None and mask.shape[-2] > 1, where="encoder",
            )
            return self.out_proj(out.reshape(*x.shape[:-1], -1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        if attention_bias is not None:
            scores = scores + attention_bias.astype(jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation an HF config names (``hidden_act``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
