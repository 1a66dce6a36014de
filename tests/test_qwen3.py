"""Qwen3/Qwen2 decoder: logits vs transformers, sharded forward, LoRA, paper-scale shapes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_fixtures import hf_positions, padded_batch, save_tiny_hf
from safetensors.numpy import load_file

from xemogpt_jax import loading, sharding
from xemogpt_jax.models import lora, presets, qwen3_params
from xemogpt_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def hf_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_hf(request.param, out)
    model, report = loading.from_hf(qwen3_params.hf_factory(out), out, qwen3_params.hf_key_map)
    return request.param, out, hf_model, model, report


@nnx.jit
def _forward(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def _hf_logits(hf_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(hf_positions(mask), dtype=torch.long),
        )
    return out.logits.float().numpy()


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_logits_match_transformers_on_padded_batch(hf_dir, left):
    family, _, hf_model, model, report = hf_dir
    assert model.config.qk_norm == (family == "qwen3") and model.config.attention_bias == (family == "qwen2")
    assert not report.missing
    ids, mask = padded_batch([7, 3, 5], 7, left=left)
    ours = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    ref = _hf_logits(hf_model, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_inputs_embeds_path_equals_token_path(hf_dir):
    model = hf_dir[3]
    ids, mask = padded_batch([6, 4], 6, left=True, seed=1)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    from_ids = model(ids, attention_mask=mask)
    from_embeds = model(inputs_embeds=model.embed(ids), attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(from_ids), np.asarray(from_embeds))


def test_export_inverts_the_key_map(hf_dir):
    _, path, _, model, _ = hf_dir
    saved = load_file(str(path / "model.safetensors"))
    exported = dict(qwen3_params.export_tensors(model))
    assert set(exported) == set(saved)
    for name, array in saved.items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    hf_config = model.config.to_hf()
    assert Qwen3Config.from_hf(hf_config) == model.config


def test_forward_on_fsdp_tensor_mesh_equals_single_device(hf_dir, devices):
    _, path, _, single, _ = hf_dir
    mesh = sharding.make_mesh((1, 2, 4))
    sharded, _ = loading.from_hf(qwen3_params.hf_factory(path), path, qwen3_params.hf_key_map, mesh)
    kernel = sharded.layers.mlp.gate_proj.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ids, mask = padded_batch([8, 5, 6, 2], 8, left=True, seed=2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    expected = np.asarray(_forward(single, ids, mask))
    graphdef, state = nnx.split(sharded)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    with jax.set_mesh(mesh):
        got = forward(state, jax.device_put(ids, sharding.batch_sharding(mesh, 2)), mask)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def _tiny_config(**overrides) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960,
        tie_word_embeddings=True, **overrides,
    )


def _copy_base(src: nnx.Module, dst: nnx.Module) -> None:
    base = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(src, nnx.Param))}
    for path, variable in nnx.to_flat_state(nnx.state(dst, nnx.Param)):
        if not isinstance(variable, lora.LoraParam):
            variable.set_value(base[tuple(path)].get_value())


def test_lora_zero_b_equals_base_and_merge_equals_unmerged():
    adapters = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    base = Qwen3ForCausalLM(_tiny_config(), rngs=nnx.Rngs(0))
    with_lora = Qwen3ForCausalLM(_tiny_config(lora=adapters), rngs=nnx.Rngs(1))
    _copy_base(base, with_lora)
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 64)
    np.testing.assert_allclose(np.asarray(_forward(with_lora, ids)), np.asarray(_forward(base, ids)), atol=1e-6, rtol=0)

    adapter_state = nnx.state(with_lora, lora.LoraParam)
    assert {tuple(p)[-2] for p, _ in nnx.to_flat_state(adapter_state)} == {"q_proj", "v_proj", "down_proj"}
    for i, (_, variable) in enumerate(nnx.to_flat_state(adapter_state)):
        if variable.get_value().shape[-2] == 4:  # a B matrix [L, r, out]
            variable.set_value(0.05 * jax.random.normal(jax.random.key(i), variable.get_value().shape))
    unmerged = np.asarray(_forward(with_lora, ids))
    assert np.abs(unmerged - np.asarray(_forward(base, ids))).max() > 1e-3
    lora.merge_lora(with_lora)
    assert not nnx.to_flat_state(nnx.state(with_lora, lora.LoraParam))
    np.testing.assert_allclose(np.asarray(_forward(with_lora, ids)), unmerged, atol=1e-5, rtol=0)


def test_lora_only_adapters_are_trainable_and_dropout_needs_a_key():
    import optax

    model = Qwen3ForCausalLM(_tiny_config(lora=lora.LoraConfig(rank=4, alpha=4.0, dropout=0.5)), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=lora.LoraParam)
    before = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 64)

    def loss(m):
        return m(ids, dropout_rng=jax.random.key(3)).mean()

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.LoraParam)))(model)
    optimizer.update(model, grads)
    for path, new in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        changed = not np.array_equal(before[tuple(path)], np.asarray(new.get_value()))
        assert changed == (tuple(path)[-1] == "lora_b"), path  # A's grad is zero while B is zero
    np.testing.assert_array_equal(np.asarray(_forward(model, ids)), np.asarray(_forward(model, ids)))
    assert not np.array_equal(
        np.asarray(model(ids, dropout_rng=jax.random.key(1))), np.asarray(model(ids, dropout_rng=jax.random.key(2)))
    )


def test_remat_and_bf16_options():
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 64)
    plain = Qwen3ForCausalLM(_tiny_config(), rngs=nnx.Rngs(0))
    remat = Qwen3ForCausalLM(_tiny_config(remat=True), rngs=nnx.Rngs(0))
    bf16 = Qwen3ForCausalLM(_tiny_config(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

    unrolled = Qwen3ForCausalLM(_tiny_config(unroll_layers=True), rngs=nnx.Rngs(0))
    g_plain = nnx.jit(nnx.grad(loss))(plain)
    for other in (remat, unrolled):
        g_other = nnx.jit(nnx.grad(loss))(other)
        for (p, a), (_, b) in zip(nnx.to_flat_state(g_plain), nnx.to_flat_state(g_other)):
            np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=1e-6, err_msg=str(p))
    assert bf16.embed(ids).dtype == jnp.bfloat16
    assert bf16.layers.mlp.up_proj.kernel.get_value().dtype == jnp.float32
    out = _forward(bf16, ids)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(_forward(plain, ids)), atol=3e-2, rtol=0)


def test_qwen3_4b_builds_abstractly_and_shards(devices):
    config = Qwen3Config.from_hf(presets.get("llm", "qwen3-4b"))
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    count = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(state))
    assert abs(count - 4_022_468_096) < 1_000_000, count
    mesh = sharding.make_mesh((1, 2, 4))
    shardings = sharding.state_shardings(state, mesh)
    big_replicated = [
        path
        for (path, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings))
        if math.prod(v.get_value().shape) > 1_000_000 and s.is_fully_replicated
    ]
    assert not big_replicated


def test_qwen25_7b_config_is_untied_with_bias():
    config = Qwen3Config.from_hf(presets.get("llm", "qwen2.5-7b"))
    assert (config.head_dim, config.attention_bias, config.qk_norm) == (128, True, False)
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)))
    count = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert abs(count - 7_615_616_512) < 1_000_000, count
