"""Optimizer construction: schedule values, clipping, accumulation, weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from xemogpt_jax import optim


def _optim_config(**changes):
    c = common.base_config("test").optim
    for k, v in changes.items():
        c[k] = v
    return c


def test_warmup_then_cosine_to_the_end_ratio():
    c = _optim_config(learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1)
    schedule = optim.learning_rate_schedule(c, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
    # half-way through the 100 decay steps: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55
    np.testing.assert_allclose(float(schedule(60)), 0.1 + 0.9 * (1 + math.cos(math.pi / 2)) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), 0.1, rtol=1e-5)


def test_accumulation_averages_micro_batch_gradients_before_one_update():
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
    g1 = {"w": jnp.array([[0.2, 0.0], [-0.4, 0.1]])}
    g2 = {"w": jnp.array([[0.0, 0.6], [0.2, -0.3]])}
    accumulated = optim.make_optimizer(_optim_config(accum_steps=2, warmup_steps=0), total_steps=20)
    single = optim.make_optimizer(_optim_config(accum_steps=1, warmup_steps=0), total_steps=10)
    state = accumulated.init(params)
    updates, state = accumulated.update(g1, state, params)
    assert float(jnp.abs(updates["w"]).max()) == 0.0  # nothing applied after the first micro-batch
    updates, state = accumulated.update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = single.update(mean, single.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(expected["w"]), rtol=1e-6, atol=1e-9)


def test_gradients_are_clipped_by_global_norm():
    params = {"b": jnp.zeros((2,))}  # 1-D: no weight decay
    huge = {"b": jnp.array([300.0, 400.0])}  # global norm 500
    # b1 = 0 and eps = 1: Adam's first step is -lr * g / (|g| + 1) elementwise (bias-corrected v = g^2)
    c = _optim_config(clip_norm=1.0, warmup_steps=0, learning_rate=1.0, b1=0.0, b2=0.999, eps=1.0)
    tx = optim.make_optimizer(c, total_steps=10)
    updates, _ = tx.update(huge, tx.init(params), params)
    clipped = np.array([0.6, 0.8])
    np.testing.assert_allclose(np.asarray(updates["b"]), -clipped / (clipped + 1), rtol=1e-5)


def test_lr_multiplier_scales_only_the_named_parameters_whole_update():
    params = {"vision_tower": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]])}, "llm": {"kernel": jnp.ones((2, 2))}}
    grads = {"vision_tower": {"kernel": jnp.array([[0.2, 0.0], [-0.4, 0.1]])}, "llm": {"kernel": jnp.full((2, 2), 0.3)}}
    plain = optim.make_optimizer(_optim_config(warmup_steps=0, weight_decay=0.1), total_steps=10)
    c = _optim_config(warmup_steps=0, weight_decay=0.1)
    c.lr_multipliers = {"Vision_Tower": 0.1}
    scaled = optim.make_optimizer(c, total_steps=10)
    expected, _ = plain.update(grads, plain.init(params), params)
    updates, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["vision_tower"]["kernel"]),
                               0.1 * np.asarray(expected["vision_tower"]["kernel"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["llm"]["kernel"]), np.asarray(expected["llm"]["kernel"]))
