"""Generation vs transformers ``generate`` on a tiny random Qwen3 model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_fixtures import EOS, padded_batch, save_tiny_hf
from transformers.generation.logits_process import TopPLogitsWarper

from xemogpt_jax import loading
from xemogpt_jax.generate import GenerationConfig, _generate_jit, generate, top_p_filter
from xemogpt_jax.models import qwen3_params

PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3_gen")
    hf_model = save_tiny_hf("qwen3", out, seed=3)
    model, _ = loading.from_hf(qwen3_params.hf_factory(out), out, qwen3_params.hf_key_map)
    return hf_model, model


def _hf_new_tokens(hf_model, ids, mask, n, eos=EOS, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            max_new_tokens=n, pad_token_id=PAD, eos_token_id=eos, do_sample=False, **kwargs,
        )
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=PAD)


def _emitted_eos(hf_model, ids, mask, n, **kwargs) -> tuple[int, np.ndarray]:
    """A token the tiny model emits mid-way in its last row (it never emits the configured EOS), used as
    EOS so the comparison covers finished rows and the finished-beam pool; returns it and transformers'
    output under it."""
    free_running = _hf_new_tokens(hf_model, ids, mask, n, **kwargs)
    eos = int(free_running[-1, n // 2])
    expected = _hf_new_tokens(hf_model, ids, mask, n, eos=eos, **kwargs)
    assert not np.array_equal(expected, free_running), "the chosen EOS must change the outcome"
    return eos, expected


def test_greedy_matches_transformers_and_all_prompt_forms_agree(tiny):
    hf_model, model = tiny
    ids, mask = padded_batch([9, 4, 6], 9, left=True, seed=5)
    eos, expected = _emitted_eos(hf_model, ids, mask, 32)
    config = GenerationConfig(max_new_tokens=32, eos_token_id=eos, pad_token_id=PAD)
    ours = np.asarray(generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), config=config).tokens)
    np.testing.assert_array_equal(ours, expected)

    from_embeds = generate(
        model, inputs_embeds=model.embed(jnp.asarray(ids)), attention_mask=jnp.asarray(mask), config=config
    ).tokens
    np.testing.assert_array_equal(np.asarray(from_embeds), ours)
    right_ids, right_mask = padded_batch([9, 4, 6], 9, left=False, seed=5)
    from_right = generate(model, jnp.asarray(right_ids), attention_mask=jnp.asarray(right_mask), config=config).tokens
    np.testing.assert_array_equal(np.asarray(from_right), ours)


def test_beam_search_best_sequences_match_transformers(tiny):
    hf_model, model = tiny
    ids, mask = padded_batch([5, 3], 5, left=True, seed=7)
    eos, expected = _emitted_eos(hf_model, ids, mask, 10, num_beams=4)
    config = GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, num_beams=4)
    ours = np.asarray(generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), config=config).tokens)
    np.testing.assert_array_equal(ours, expected)
    no_eos = GenerationConfig(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, num_beams=4)
    ours = np.asarray(generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), config=no_eos).tokens)
    np.testing.assert_array_equal(ours, _hf_new_tokens(hf_model, ids, mask, 10, num_beams=4))


@pytest.mark.parametrize("beams", [1, 3])
def test_token_logprobs_match_transformers_scores(tiny, beams):
    """Greedy: log-softmax of HF's raw logits at each chosen token; beams: HF's transition scores of the best beam."""
    hf_model, model = tiny
    ids, mask = padded_batch([7, 4], 7, left=True, seed=11)
    n, top = 6, 3
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=n,
            min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS, do_sample=False, num_beams=beams,
            output_logits=True, output_scores=True, return_dict_in_generate=True,
        )
    raw = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    if beams == 1:
        expected = torch.gather(raw, 2, out.sequences[:, ids.shape[1]:, None])[..., 0].numpy()
    else:
        expected = hf_model.compute_transition_scores(out.sequences, out.scores, out.beam_indices).numpy()
    config = GenerationConfig(max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD, num_beams=beams,
                              top_logprobs=top)
    ours = generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), config=config)
    np.testing.assert_array_equal(np.asarray(ours.tokens), out.sequences[:, ids.shape[1]:].numpy())
    np.testing.assert_allclose(np.asarray(ours.logprobs), expected, atol=1e-5)
    if beams == 1:
        top_values, top_ids = torch.topk(raw, top, dim=-1)
        np.testing.assert_array_equal(np.asarray(ours.top_ids), top_ids.numpy())
        np.testing.assert_allclose(np.asarray(ours.top_logprobs), top_values.numpy(), atol=1e-5)


def test_top_p_filter_matches_transformers_warper():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for top_p in (0.3, 0.8, 0.95):
        ref = TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
        ours = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tiny):
    _, model = tiny
    ids, mask = padded_batch([6, 3], 6, left=True, seed=9)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    plain = GenerationConfig(max_new_tokens=8, pad_token_id=PAD)
    greedy = generate(model, ids, attention_mask=mask, config=plain).tokens
    nucleus = GenerationConfig(max_new_tokens=8, pad_token_id=PAD, do_sample=True, temperature=0.7, top_p=1e-6)
    nucleus_tokens = generate(model, ids, attention_mask=mask, config=nucleus, rng=jax.random.key(0)).tokens
    np.testing.assert_array_equal(np.asarray(nucleus_tokens), np.asarray(greedy))
    hot = GenerationConfig(max_new_tokens=8, pad_token_id=PAD, do_sample=True, temperature=5.0)
    a = generate(model, ids, attention_mask=mask, config=hot, rng=jax.random.key(1)).tokens
    b = generate(model, ids, attention_mask=mask, config=hot, rng=jax.random.key(1)).tokens
    c = generate(model, ids, attention_mask=mask, config=hot, rng=jax.random.key(2)).tokens
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_unstacked_layers_decode_alike_and_the_loop_holds_no_second_copy_of_them(tmp_path):
    """Decoding's CPU layout (``unstack_layers``, what ``explainer.load`` gives there) against transformers, and XLA's
    memory plan of the decode program: stacked, it holds every layer's weights a second time (the slices taken
    before the loop); unstacked, not."""
    hf_model = save_tiny_hf("qwen3", tmp_path, seed=3)
    stacked, _ = loading.from_hf(qwen3_params.hf_factory(tmp_path), tmp_path, qwen3_params.hf_key_map)
    unstacked, _ = loading.from_hf(qwen3_params.hf_factory(tmp_path), tmp_path, qwen3_params.hf_key_map)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(unstacked.layers)))
    unstacked.unstack_layers()
    assert len(unstacked.layers) == unstacked.config.num_hidden_layers
    assert sum(x.nbytes for x in jax.tree.leaves(nnx.state(unstacked.layers))) == layer_bytes

    ids, mask = padded_batch([9, 4, 6], 9, left=True, seed=5)
    with torch.no_grad():
        expected_logits = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask)).logits.numpy()
    logits = np.asarray(unstacked(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(logits[mask == 1], expected_logits[mask == 1], atol=1e-4)
    eos, expected = _emitted_eos(hf_model, ids, mask, 16)
    temps = {}
    for name, model in (("stacked", stacked), ("unstacked", unstacked)):
        for beams in (1, 3):
            config = GenerationConfig(max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD, num_beams=beams)
            if beams == 1:
                tokens = generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), config=config).tokens
                np.testing.assert_array_equal(np.asarray(tokens), expected, err_msg=name)
            graphdef, state = nnx.split(model)
            compiled = _generate_jit.lower(graphdef, state, jnp.asarray(ids), None, jnp.asarray(mask),
                                           jax.random.key(0), config, None).compile()
            temps[name, beams] = compiled.memory_analysis().temp_size_in_bytes
    for beams in (1, 3):
        assert temps["stacked", beams] - temps["unstacked", beams] >= layer_bytes, (temps, layer_bytes)
