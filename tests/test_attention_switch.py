"""``model.attention`` and the remat settings: resolution, threading from the run config, equal outputs."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import align_audio, align_video, sft
from xemogpt_jax import run_config
from xemogpt_jax.models import layers
from xemogpt_jax.models.attention import AttentionConfig, backend_for, dot_product_attention
from xemogpt_jax.models.bert import BertConfig
from xemogpt_jax.models.clip import CLIPConfig, CLIPVisionConfig, CLIPVisionModel, causal_bias
from xemogpt_jax.models.hubert import HubertConfig
from xemogpt_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM


def test_auto_picks_each_platforms_kernel():
    assert backend_for("cpu") == "blocked" and backend_for("tpu") == "splash"
    assert backend_for("gpu", jnp.bfloat16) == backend_for("gpu", jnp.float16) == "cudnn"
    assert backend_for("gpu", jnp.float32) == "xla"  # cuDNN refuses f32: an f32 model still runs on a GPU
    assert AttentionConfig().resolved() == backend_for(jax.default_backend())
    assert AttentionConfig("xla").resolved() == "xla"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        AttentionConfig("flash")


def test_run_config_threads_one_switch_to_every_model():
    config = sft.get_config("tiny")
    assert config.model.attention == "auto" and config.model.remat == "none"
    config.model.attention, config.model.splash_block_q, config.model.remat_towers = "xla", 256, "dots_saveable"
    model = run_config.xemogpt_config(config)
    want = AttentionConfig("xla", block_q=256)
    assert model.llm.attention == model.vision.attention == model.hubert.attention == want
    assert model.vecb.encoder.attention == model.aecb.encoder.attention == want  # the bridges are tower layers
    assert model.vision.remat == model.hubert.remat == "dots_saveable" and model.llm.remat == "none"
    for stage in (align_video, align_audio):
        c = stage.get_config("tiny")
        c.model.attention = "splash"
        for encoder in (CLIPConfig(), HubertConfig(), BertConfig()):
            options = run_config.with_runtime_options(encoder, c)
            for part in (options.text, options.vision) if isinstance(options, CLIPConfig) else (options,):
                assert part.attention.impl == "splash"


def test_stored_boolean_remat_still_reads():
    config = sft.get_config("tiny").to_dict()
    for stored, want in ((True, "full"), (False, "none")):
        config["model"]["remat"] = stored
        assert run_config.xemogpt_config(config).llm.remat == want
    config["model"].pop("attention")  # a run config stored before the switch
    assert run_config.xemogpt_config(config).llm.attention == AttentionConfig()
    with pytest.raises(ValueError, match="remat='sometimes'"):
        layers.remat_name("sometimes")


def _llm(**overrides) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=128,
        tie_word_embeddings=True, **overrides,
    )
    return Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))


def _loss_and_grads(model, ids, mask):
    def loss(model):
        return jnp.mean(model(ids, attention_mask=mask) ** 2 * mask[..., None])

    return nnx.value_and_grad(loss)(model)


@pytest.fixture(scope="module")
def llm_batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, size=(2, 24)), jnp.int32)
    mask = jnp.asarray(np.arange(24)[None] < np.array([[24], [17]]), jnp.int32)
    return ids, mask


@pytest.mark.parametrize("remat", layers.REMAT_CHOICES[1:5])
def test_llm_remat_policies_leave_loss_and_gradients_alone(llm_batch, remat):
    want_loss, want_grads = _loss_and_grads(_llm(), *llm_batch)
    loss, grads = _loss_and_grads(_llm(remat=remat), *llm_batch)
    assert float(loss) == float(want_loss)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), grads, want_grads)


def test_llm_xla_attention_matches_blocked(llm_batch):
    want_loss, want_grads = _loss_and_grads(_llm(), *llm_batch)
    loss, grads = _loss_and_grads(_llm(attention=AttentionConfig("xla")), *llm_batch)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, want_grads)


def test_tower_remat_leaves_gradients_alone():
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    def grads(remat):
        model = CLIPVisionModel(config.__class__(**{**config.__dict__, "remat": remat}), rngs=nnx.Rngs(0))
        return nnx.grad(lambda m: jnp.mean(m(pixels).pooler_output ** 2))(model)

    want = grads("none")
    for remat in ("full", "save_qkv_proj"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), grads(remat), want)


@pytest.mark.parametrize("causal", [False, True], ids=["key_padding", "causal_clip_text"])
def test_encoder_attention_backends_agree(causal):
    """layers.SelfAttention reads its additive bias as a mask for xla and splash (interpret mode)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 20, 32)), jnp.float32)
    valid = jnp.asarray(np.arange(20)[None] < np.array([[20], [11]]))
    bias = causal_bias(valid, 20) if causal else layers.key_mask_bias(valid)
    outs = {}
    for impl in ("blocked", "xla", "splash"):
        attention = AttentionConfig(impl, block_q=128, block_kv=128, interpret=True)
        module = layers.SelfAttention(32, 4, rngs=nnx.Rngs(0), attention=attention)
        outs[impl] = np.asarray(module(x, bias))
    np.testing.assert_allclose(outs["xla"], outs["blocked"], atol=1e-5)
    np.testing.assert_allclose(outs["splash"], outs["blocked"], atol=1e-5)


ON_GPU = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cudnn attention needs a GPU (run with XEMOGPT_TEST_PLATFORMS=cuda,cpu)"
)


@ON_GPU
@pytest.mark.parametrize("causal", [True, False], ids=["causal_gqa", "bidirectional_padded"])
def test_cudnn_values_and_gradients_match_xla(causal, caplog):
    """bf16, a length no block size divides, a padded key tail; causal with 8 query heads on 2 KV heads."""
    caplog.set_level(logging.INFO, logger="xemogpt_jax.models.attention")
    rng = np.random.default_rng(0)
    heads, kv_heads = (8, 2) if causal else (4, 4)
    q = jnp.asarray(rng.normal(size=(2, 200, heads, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(2, 200, kv_heads, 64)), jnp.bfloat16) for _ in range(2))
    key_mask = jnp.asarray(np.arange(200)[None] < np.array([[200], [131]]))
    weights = jnp.asarray(rng.normal(size=(2, 200, heads, 64)), jnp.float32)

    def run(impl):
        def loss(q, k, v):
            out = dot_product_attention(
                q, k, v, scale=0.125, config=AttentionConfig(impl), causal=causal, key_mask=key_mask
            )
            return jnp.sum(out.astype(jnp.float32) * weights), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    for got, want in zip(run("cudnn"), run("xla"), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-2 * max(1.0, np.abs(want).max()), rtol=0)
    assert "attention: attention runs cudnn" in {r.getMessage() for r in caplog.records}


@ON_GPU
def test_cudnn_refuses_float32_and_auto_runs_xla_for_it(caplog):
    """An explicit ``cudnn`` never falls back; ``auto`` says in the log that f32 ran on ``xla``."""
    caplog.set_level(logging.INFO, logger="xemogpt_jax.models.attention")
    q = jnp.ones((1, 16, 2, 64), jnp.float32)
    with pytest.raises(Exception, match="(?i)(dtype|float32|f32|bf16|fp16)"):
        dot_product_attention(q, q, q, scale=0.125, config=AttentionConfig("cudnn"), causal=True)
    dot_product_attention(q, q, q, scale=0.125, config=AttentionConfig("auto"), causal=True, where="llm")
    assert "attention: llm runs xla" in {r.getMessage() for r in caplog.records}
