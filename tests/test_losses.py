"""Loss functions against hand-computed values (plain Python / numpy loops)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from xemogpt_jax import losses


def _log_softmax_row(row):
    m = max(row)
    return [v - m - math.log(sum(math.exp(u - m) for u in row)) for v in row]


def test_info_nce_matches_a_hand_computation():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    scale = 3.0
    na = a / np.linalg.norm(a, axis=1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = [[scale * float(na[i] @ nb[j]) for j in range(3)] for i in range(3)]
    rows = -sum(_log_softmax_row(sim[i])[i] for i in range(3)) / 3
    cols = -sum(_log_softmax_row([sim[j][i] for j in range(3)])[i] for i in range(3)) / 3
    expected = (rows + cols) / 2
    got = losses.info_nce(jnp.asarray(a), jnp.asarray(b), jnp.log(scale))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_info_nce_clips_the_scale_and_rewards_alignment():
    x = np.eye(4)
    big = losses.info_nce(jnp.asarray(x), jnp.asarray(x), jnp.log(1e6))
    # at the clipped scale 100 the diagonal dominates completely
    assert float(big) < 1e-10
    assert abs(float(losses.init_logit_scale()) - math.log(1 / 0.07)) < 1e-6
    wrong = losses.info_nce(jnp.asarray(x), jnp.asarray(x[::-1]), jnp.log(10.0))
    assert float(wrong) > 5


def test_bce_and_ftd_match_hand_values():
    logits = np.array([2.0, -1.0, 0.0, 30.0])
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    log_sig, log_one_minus_sig = -np.log1p(np.exp(-logits)), -np.log1p(np.exp(logits))
    expected = -np.mean(labels * log_sig + (1 - labels) * log_one_minus_sig)
    got = losses.binary_cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    original, shuffled = np.array([1.5, -0.5]), np.array([0.2, -3.0])
    ftd = losses.frame_temporal_discrimination(jnp.asarray(original), jnp.asarray(shuffled))
    hand = -(
        math.log(1 / (1 + math.exp(-1.5))) + math.log(1 / (1 + math.exp(0.5)))
        + math.log(1 - 1 / (1 + math.exp(-0.2))) + math.log(1 - 1 / (1 + math.exp(3.0)))
    ) / 4
    np.testing.assert_allclose(float(ftd), hand, rtol=1e-6)


def test_shuffled_frame_order_permutes_each_sample_and_never_returns_the_identity():
    frames = jnp.broadcast_to(jnp.arange(3.0)[None, :, None], (64, 3, 2))
    order = losses.shuffled_frame_order(jax.random.key(0), 64, 3)
    shuffled = np.asarray(jnp.take_along_axis(frames, order[:, :, None], axis=1))
    for row in shuffled:
        assert sorted(row[:, 0].tolist()) == [0.0, 1.0, 2.0]
        assert row[:, 0].tolist() != [0.0, 1.0, 2.0]
        np.testing.assert_array_equal(row[:, 0], row[:, 1])


def test_masked_frame_modeling_averages_over_masked_frames_only():
    predicted = np.array([[[1.0, 1.0], [0.0, 0.0], [3.0, 1.0]]])
    target = np.array([[[0.0, 1.0], [5.0, 5.0], [1.0, 1.0]]])
    mask = np.array([[True, False, True]])
    expected = ((1.0 + 0.0) / 2 + (4.0 + 0.0) / 2) / 2
    got = losses.masked_frame_modeling(jnp.asarray(predicted), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    none = losses.masked_frame_modeling(jnp.asarray(predicted), jnp.asarray(target), jnp.zeros((1, 3), bool))
    assert float(none) == 0.0


def test_frame_mask_ratio():
    mask = losses.sample_frame_mask(jax.random.key(1), (400, 16), 0.5)
    assert abs(float(mask.mean()) - 0.5) < 0.02


def test_causal_lm_cross_entropy_scores_only_labelled_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5))
    labels = np.array([[-100, 3, 1, -100], [2, 2, -100, -100]])
    terms = [
        -_log_softmax_row(list(logits[b, t]))[labels[b, t]] for b in range(2) for t in range(4) if labels[b, t] != -100
    ]
    loss, count = losses.causal_lm_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(loss), sum(terms) / len(terms), rtol=1e-6)
    assert float(count) == 4
