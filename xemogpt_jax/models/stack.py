"""A stack of identical encoder layers: created with ``nnx.vmap``, applied with one ``jax.lax.scan``.

The compiler then sees one layer, not 24: the paper-scale stage-3 step, whose CLIP ViT-L and HuBERT-large
towers were Python loops, spent most of its TPU compile time on their 48 copies. Every stacked parameter
gains a leading ``"layers"`` logical axis (replicated by the rules table), and checkpoints address a layer
as a slot of that axis (``hf_io.Target.index``), as the Qwen3 LLM's scanned layers do.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from xemogpt_jax.models.layers import remat_policy


def prefix_layers_axis(module: nnx.Module) -> None:
    """Stacked parameters gain a leading ``"layers"`` logical axis."""
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Variable) and "logical_axes" in variable.get_metadata():
            variable.set_metadata("logical_axes", ("layers", *variable.get_metadata()["logical_axes"]))


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` layers built by ``make``, their parameters stacked on a leading axis (own random init each)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make(layer_rngs)

    layers = build(rngs)
    prefix_layers_axis(layers)
    return layers


def scan_layers(
    layers: nnx.Module,
    x: jax.Array,
    *shared: jax.Array | None,
    remat: str | bool | None = None,
    unroll: bool = False,
    after: Callable[[jax.Array], jax.Array] = lambda h: h,
) -> jax.Array:
    """``x`` through every layer of a stack in order: ``h = after(layer(h, *shared))``.

    ``remat`` names the per-layer rematerialisation (``layers.REMAT_CHOICES``); ``unroll`` lays the layers
    out one after another (what the compiler's cost analysis needs to count each of them).
    """
    graphdef, state = nnx.split(layers)

    def body(h: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
        return after(nnx.merge(graphdef, layer_state)(h, *shared)), None

    enabled, policy = remat_policy(remat)
    if enabled:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, state, unroll=unroll)
    return x


def unstack_layers(layers: nnx.Module, count: int) -> nnx.List:
    """A stack's layers as modules with arrays of their own, for a decode loop.

    Stacked, a decode loop slices every layer out before its ``while_loop`` (sliced inside, each step
    would copy them again), and XLA's CPU backend holds those slices beside the stack for as long as the
    loop runs (``generate.prepare_for_decoding`` says where this is used). Here each stacked array is
    dropped as soon as it is sliced, so the stack is never held twice; ``layers`` is left holding only
    the shapes of its arrays.
    """
    graphdef, state = nnx.split(layers)
    per_layer: list[list[tuple]] = [[] for _ in range(count)]
    for path, variable in nnx.to_flat_state(state):
        stacked = variable.get_value()
        axes = variable.get_metadata().get("logical_axes")
        for i in range(count):
            one = variable.replace(value=stacked[i])
            if axes is not None:
                one.set_metadata("logical_axes", axes[1:])
            per_layer[i].append((path, one))
        variable.set_value(jax.ShapeDtypeStruct(stacked.shape, stacked.dtype))
        del stacked
    return nnx.List([nnx.merge(graphdef, nnx.from_flat_state(own)) for own in per_layer])
