"""Plain-JAX reproducer: XLA's SPMD partitioner gives a dot the wrong batch rows, so samples 1 and 2 swap.

On a (2, 2, 2) ("data", "fsdp", "tensor") mesh of 8 CPU devices, ``y = (x + x @ w) * 2`` is wrong when

* ``x [4, 64]`` is split over ``tensor`` on its feature axis, ``P(None, "tensor")``,
* ``w [64, 64]`` is ``P("tensor", "fsdp")`` (the project's ``("heads", "embed")`` out-projection kernel),
* the result is pinned to batch sharding ``P(("data", "fsdp"))`` (the project's ``HIDDEN_AXES``).

Shardy's propagation is fine (the dot is batch-sharded over (data, fsdp)). The SPMD partitioner then feeds the
dot the batch row of the per-device table ``{0, 0, 2, 2, 1, 1, 3, 3}`` ((fsdp, data) order) while the
residual ``x`` uses ``{0, 0, 1, 1, 2, 2, 3, 3}`` ((data, fsdp) order, the right one): samples 1 and 2 get
each other's ``x @ w``. Replicated ``w``, ``w`` as ``P("tensor")`` or ``P(None, "fsdp")``, no elementwise
op after the add, a width of 4, or ``x [4, 16, 64]`` in this minimal body are all
correct. ``--clip-layer`` runs one pre-LN CLIP encoder layer (4 heads, quick_gelu MLP, the project's parameter
shardings) on ``x [4, 16, 64]`` sharded the same way: the bug found in ``VECB`` (commit 95569cb).

Seen with jax / jaxlib 0.10.2 on CPU, Shardy (default) and GSPMD (``--gspmd``) alike.

Run: ``python tools/xla_repro_swapped_residual.py [--clip-layer] [--gspmd]``. Expected output (minimal case):
per-sample max |8 devices - 1 device| ``[~5e-7, 2.33, 2.33, ~8e-7]``, ~8e-7 against samples 1 and 2 swapped
in ``x @ w``, then the device -> shard-index tables of the compiled HLO, among them the wrong
``{0, 0, 2, 2, 1, 1, 3, 3}``. ``--clip-layer``: about ``[2e-7, 0.029, 0.029, 2e-7]``.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

if "--gspmd" in sys.argv:
    jax.config.update("jax_use_shardy_partitioner", False)

B, T, D, HEADS, MLP = 4, 16, 64, 4, 128
BATCH = P(("data", "fsdp"))


def minimal(p, x):
    return (x + x @ p["w"]) * 2


MINIMAL_PARAMS = {"w": ((D, D), P("tensor", "fsdp"))}


def layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-5) * scale + bias


def clip_layer(p, x):
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"])
    q, k, v = ((h @ p[f"{n}_kernel"] + p[f"{n}_bias"]).reshape(B, T, HEADS, D // HEADS) for n in "qkv")
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * (D // HEADS) ** -0.5, axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T, D) @ p["o_kernel"] + p["o_bias"]
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["fc1_kernel"] + p["fc1_bias"]
    return x + (h * jax.nn.sigmoid(1.702 * h)) @ p["fc2_kernel"] + p["fc2_bias"]


CLIP_PARAMS = {  # logical axes ("embed", "heads"/"mlp") -> ("fsdp", "tensor"); norms replicated
    **{f"{n}_kernel": ((D, D), P("fsdp", "tensor")) for n in "qkv"},
    **{f"{n}_bias": ((D,), P("tensor")) for n in "qkv"},
    "o_kernel": ((D, D), P("tensor", "fsdp")),
    "o_bias": ((D,), P("fsdp")),
    "fc1_kernel": ((D, MLP), P("fsdp", "tensor")),
    "fc1_bias": ((MLP,), P("tensor")),
    "fc2_kernel": ((MLP, D), P("tensor", "fsdp")),
    "fc2_bias": ((D,), P("fsdp")),
    **{f"ln{i}_{n}": ((D,), P(None)) for i in (1, 2) for n in ("scale", "bias")},
}


def main():
    clip = "--clip-layer" in sys.argv
    body, specs, x_shape = (clip_layer, CLIP_PARAMS, (B, T, D)) if clip else (minimal, MINIMAL_PARAMS, (B, D))
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape, dtype=np.float32) * 0.05 for name, (shape, _) in specs.items()}
    x = rng.standard_normal(x_shape, dtype=np.float32)
    one_device = np.asarray(jax.jit(body)(params, x))

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        sharded = {name: jax.device_put(params[name], NamedSharding(mesh, spec)) for name, (_, spec) in specs.items()}
        x_split = jax.device_put(x, NamedSharding(mesh, P(*[None] * (x.ndim - 1), "tensor")))
        step = jax.jit(
            lambda p, x: jax.lax.with_sharding_constraint(body(p, x), BATCH), out_shardings=NamedSharding(mesh, P())
        )
        eight_devices = np.asarray(step(sharded, x_split))
        hlo = step.lower(sharded, x_split).compile().as_text()

    partitioner = "shardy" if jax.config.jax_use_shardy_partitioner else "gspmd"
    print(f"jax {jax.__version__}, {partitioner}, {body.__name__}")
    print("max |8 devices - 1 device| per sample:", np.abs(eight_devices - one_device).reshape(B, -1).max(1))
    if body is minimal:
        swapped = (x + (x @ params["w"])[[0, 2, 1, 3]]) * 2
        print("max |8 devices - samples 1, 2 swapped in x @ w|:", np.abs(eight_devices - swapped).max())
        print("device (4*data + 2*fsdp + tensor) -> shard-index tables in the compiled HLO:")
        for line in hlo.splitlines():
            if "32[8]{0} constant(" in line:
                print("   ", line.split(", metadata")[0].strip())


if __name__ == "__main__":
    main()
