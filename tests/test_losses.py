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


LABELS = np.array([[-100, 3, 1, -100, 0], [2, 2, -100, -100, 4], [-100] * 5])  # the last row scores nothing


def _whole_logits_loss(hidden, kernel, labels):
    """The loss with every logit built at once, by plain jnp: the second code path the chunked one must equal."""
    logits = jnp.matmul(hidden, kernel.astype(hidden.dtype)).astype(jnp.float32)
    scored = labels != -100
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.where(scored, labels, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(scored, picked, 0.0)) / jnp.maximum(jnp.sum(scored), 1)


def _hidden_and_kernel(dtype=np.float32):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(3, 5, 4)), dtype), jnp.asarray(rng.normal(size=(4, 6)), dtype)


def test_causal_lm_cross_entropy_scores_only_labelled_positions():
    hidden, kernel = _hidden_and_kernel()
    logits = np.asarray(hidden) @ np.asarray(kernel)
    terms = [-_log_softmax_row(list(logits[b, t]))[LABELS[b, t]]
             for b in range(3) for t in range(5) if LABELS[b, t] != -100]
    for chunk in (1, 2, 3, 5, 512):  # 2 and 3 leave the last chunk short: it is padded with ignored positions
        loss, count = losses.causal_lm_cross_entropy(hidden, kernel, jnp.asarray(LABELS), chunk)
        np.testing.assert_allclose(float(loss), sum(terms) / len(terms), rtol=1e-6, err_msg=f"chunk {chunk}")
        assert int(count) == 6


def test_target_logprobs_are_each_labels_log_softmax_by_hand():
    """What ``infer --score`` reports per token, in chunks: by hand, and 0 where nothing is scored."""
    hidden, kernel = _hidden_and_kernel()
    logits = np.asarray(hidden) @ np.asarray(kernel)
    want = np.array([[0.0 if LABELS[b, t] == -100 else _log_softmax_row(list(logits[b, t]))[LABELS[b, t]]
                      for t in range(5)] for b in range(3)])
    for chunk in (1, 2, 3, 5, 512):
        got = losses.target_logprobs(hidden, kernel, jnp.asarray(LABELS), chunk)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7, err_msg=f"chunk {chunk}")


def test_causal_lm_cross_entropy_gradients_equal_those_of_the_whole_logits():
    """The gradients the chunked pass takes in its forward equal autodiff through whole logits, for the
    hidden states alone (a frozen projection) and for both; ignored positions get none."""
    labels = jnp.asarray(LABELS)
    for dtype, tolerance in ((np.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        hidden, kernel = _hidden_and_kernel(dtype)
        want = jax.grad(_whole_logits_loss, argnums=(0, 1))(hidden, kernel, labels)
        for chunk in (1, 2, 5):
            got_hidden = jax.grad(lambda h: losses.causal_lm_cross_entropy(h, kernel, labels, chunk)[0])(hidden)
            got = jax.grad(lambda h, k: losses.causal_lm_cross_entropy(h, k, labels, chunk)[0], (0, 1))(hidden, kernel)
            for name, g, w in (("hidden alone", got_hidden, want[0]), ("hidden", got[0], want[0]),
                               ("kernel", got[1], want[1])):
                assert g.dtype == w.dtype, name
                np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tolerance,
                                           err_msg=f"{name}, chunk {chunk}, {dtype}")
            assert not np.asarray(got[0], np.float32)[np.asarray(LABELS) == -100].any()


def test_nothing_scored_gives_zero_loss_and_gradient():
    hidden, kernel = _hidden_and_kernel()
    labels = jnp.full((3, 5), -100)
    loss, count = losses.causal_lm_cross_entropy(hidden, kernel, labels, 2)
    grads = jax.grad(lambda h, k: losses.causal_lm_cross_entropy(h, k, labels, 2)[0], (0, 1))(hidden, kernel)
    assert float(loss) == 0.0 and int(count) == 0
    assert not any(np.asarray(g).any() for g in grads)


def test_the_chunked_loss_never_holds_the_whole_logits():
    """XLA's memory plan of the loss and its gradient: whole [4, 2048, 32000] fp32 logits take 1 GiB; in chunks
    of 256 positions the step's temporaries are a few chunks' worth."""
    hidden = jax.ShapeDtypeStruct((4, 2048, 64), jnp.float32)
    kernel = jax.ShapeDtypeStruct((64, 32000), jnp.float32)
    labels = jax.ShapeDtypeStruct((4, 2048), jnp.int32)

    def temporaries(chunk: int) -> int:
        step = jax.jit(jax.grad(lambda h, k, y: losses.causal_lm_cross_entropy(h, k, y, chunk)[0], (0, 1)))
        return step.lower(hidden, kernel, labels).compile().memory_analysis().temp_size_in_bytes

    whole_logits, chunk_logits = 4 * 2048 * 32000 * 4, 4 * 256 * 32000 * 4
    assert temporaries(2048) >= whole_logits
    assert temporaries(256) <= 3 * chunk_logits  # a chunk's logits and their gradient, not the whole
