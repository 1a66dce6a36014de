"""Mesh construction and logical-axis rules."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from xemogpt_jax import loading, sharding
from xemogpt_jax.models.layers import Linear


def test_mesh_fills_the_minus_one_axis(devices):
    assert dict(sharding.make_mesh((-1, 1, 1)).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh((1, 1, 1), devices=devices[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("shape", [(3, 1, 1), (-1, -1, 1), (2, 2)])
def test_bad_mesh_shapes_are_refused(shape):
    with pytest.raises(ValueError):
        sharding.make_mesh(shape)


def test_logical_rules_map_to_mesh_axes():
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    with pytest.raises(KeyError):
        sharding.logical_to_spec(("no_such_axis",))


def initialised(factory, mesh):
    """A model built abstractly and initialised in its shardings, as the loader does for unset parameters."""
    model = nnx.eval_shape(factory)
    loading.init_unset(model, factory, mesh)
    return model


def test_initialisation_places_params_by_their_axes(devices):
    mesh = sharding.make_mesh((2, 2, 2))
    layer = initialised(lambda: Linear(16, 6, axes=("embed", "mlp"), rngs=nnx.Rngs(0)), mesh)
    assert layer.kernel[...].sharding.spec == P("fsdp", "tensor")
    # A dimension the mesh axis does not divide stays replicated:
    odd = initialised(lambda: Linear(16, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(0)), mesh)
    assert odd.kernel[...].sharding.spec == P("fsdp", None)
    reference = Linear(16, 6, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(layer.kernel[...]), np.asarray(reference.kernel[...]), atol=1e-6)


def test_batch_sharding_splits_the_leading_axis(devices):
    mesh = sharding.make_mesh((2, 2, 2))
    batch = jax.device_put(np.zeros((8, 3), np.float32), sharding.batch_sharding(mesh, 2))
    assert batch.sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in batch.addressable_shards} == {(2, 3)}
