"""Beam sampling (num_beams > 1 with do_sample, the release's decoding mode) and repetition penalty vs transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from qwen_fixtures import EOS, padded_batch, save_tiny_hf
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from xemogpt_jax import loading
from xemogpt_jax.generate import GenerationConfig, _beam_log_probs, generate
from xemogpt_jax.models import qwen3_params

PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3_beam_sample")
    hf_model = save_tiny_hf("qwen3", out, seed=11)
    model, _ = loading.from_hf(qwen3_params.hf_factory(out), out, qwen3_params.hf_key_map)
    return hf_model, model


def test_beam_scores_are_processed_like_transformers():
    """log-softmax, then temperature, then top-p keeping at least (EOS count + 1) tokens, as HF's beam sampling."""
    logits = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32) * 4
    log_probs = torch.log_softmax(torch.tensor(logits), dim=-1)
    for eos in ((EOS,), (EOS, 7)):
        processors = LogitsProcessorList(
            [TemperatureLogitsWarper(0.3), TopPLogitsWarper(0.9, min_tokens_to_keep=len(eos) + 1)]
        )
        expected = processors(None, log_probs).numpy()
        config = GenerationConfig(num_beams=5, do_sample=True, temperature=0.3, top_p=0.9, eos_token_id=eos)
        ours = np.asarray(_beam_log_probs(jnp.asarray(logits), config))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
        np.testing.assert_allclose(ours[~np.isinf(ours)], expected[~np.isinf(expected)], rtol=1e-5)
        assert (~np.isinf(ours)).sum(axis=1).min() >= len(eos) + 1


def test_cold_beam_sampling_is_transformers_beam_search(tiny):
    """As the temperature goes to 0 the draws become the top-k, so beam sampling must reduce to beam search."""
    hf_model, model = tiny
    ids, mask = padded_batch([6, 4], 6, left=True, seed=3)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=8,
            num_beams=3, do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
        )
    expected = np.pad(out[:, ids.shape[1]:].numpy(), ((0, 0), (0, 8 - (out.shape[1] - ids.shape[1]))))
    config = GenerationConfig(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, num_beams=3, do_sample=True,
                              temperature=1e-4)
    ours = generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), config=config,
                    rng=jax.random.key(5)).tokens
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_hot_beam_sampling_is_seeded_and_random(tiny):
    _, model = tiny
    ids, mask = padded_batch([5, 5], 5, left=True, seed=4)
    config = GenerationConfig(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, num_beams=3, do_sample=True,
                              temperature=3.0, top_p=0.95)
    runs = [np.asarray(generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), config=config,
                                rng=jax.random.key(k)).tokens) for k in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("beams", [1, 3])
def test_repetition_penalty_matches_transformers_from_embeddings(tiny, beams):
    """From input embeddings HF penalises only generated tokens; a strong penalty must change the output.

    Rows are unpadded: transformers 5 also skips the first ``pad count`` *generated* tokens of a left-padded
    row when the prompt is embeddings (its prompt_ignore_length assumes ids), a quirk we do not copy.
    """
    hf_model, model = tiny
    ids, mask = padded_batch([6, 6, 6], 6, left=True, seed=8)
    embeds = np.asarray(model.embed(jnp.asarray(ids)))

    def hf(penalty: float) -> np.ndarray:
        with torch.no_grad():
            out = hf_model.generate(
                inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask), max_new_tokens=12,
                num_beams=beams, do_sample=False, pad_token_id=PAD, eos_token_id=EOS, repetition_penalty=penalty,
            ).numpy()
        return np.pad(out, ((0, 0), (0, 12 - out.shape[1])))

    expected = hf(3.0)
    assert not np.array_equal(expected, hf(1.0))
    config = GenerationConfig(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, num_beams=beams,
                              repetition_penalty=3.0)
    ours = generate(model, inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(mask), config=config).tokens
    np.testing.assert_array_equal(np.asarray(ours), expected)
