"""HuBERT port against transformers' HubertModel: tiny random checkpoints, both layer-norm arrangements."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from xemogpt_jax import loading, sharding
from xemogpt_jax.models import hf_io, hubert_params, presets
from xemogpt_jax.models.hubert import HubertConfig, HubertEncoderLayer, HubertModel
from xemogpt_jax.models.hubert_params import ENCODER_LAYER_RULES, make_key_map
from xemogpt_jax.models.layers import key_mask_bias

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    conv_dim=(16, 16, 24),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    num_conv_pos_embedding_groups=4,
)
VARIANTS = {
    # HuBERT-large / chinese-hubert-large arrangement; even positional kernel exercises HF's same-pad trim.
    "stable": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=16),
    # HuBERT-base arrangement; odd positional kernel.
    "post_norm": dict(
        feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False, num_conv_pos_embeddings=15
    ),
}
LENGTHS = (1_600, 1_100, 1_337, 800)


def load_hubert(path, mesh=None):
    return loading.from_hf(hubert_params.hf_factory(path), path, hubert_params.hubert_key_map(), mesh)


def tiny_hf_model(variant: str, seed: int = 0) -> transformers.HubertModel:
    """A random HF HuBERT with every parameter perturbed, so norms and weight-norm gains matter."""
    torch.manual_seed(seed)
    model = transformers.HubertModel(transformers.HubertConfig(**TINY, **VARIANTS[variant])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def padded_batch(lengths=LENGTHS, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = np.zeros((len(lengths), max(lengths)), np.float32)
    mask = np.zeros_like(values, dtype=np.int32)
    for i, n in enumerate(lengths):
        values[i, :n] = rng.standard_normal(n)
        mask[i, :n] = 1
    return values, mask


@nnx.jit
def forward(model, values, mask=None):
    return model(values, mask)


def hf_forward(model, values, mask):
    with torch.no_grad():
        out = model(torch.from_numpy(values), attention_mask=torch.from_numpy(mask)).last_hidden_state
        frames = model._get_feature_vector_attention_mask(out.shape[1], torch.from_numpy(mask))
    return out.numpy(), frames.numpy()


def save_old_style(model: transformers.HubertModel, path) -> None:
    """A pytorch_model.bin with the pre-parametrization names ``weight_g`` / ``weight_v``."""
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    state = {}
    for key, tensor in model.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        state[key] = tensor.clone()
    assert "encoder.pos_conv_embed.conv.weight_g" in state
    path.mkdir()
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_hf_on_padded_batch(variant, tmp_path):
    hf_model = tiny_hf_model(variant)
    hf_model.save_pretrained(tmp_path)
    values, mask = padded_batch()
    ref_hidden, ref_frames = hf_forward(hf_model, values, mask)

    model, report = load_hubert(tmp_path)
    assert not report.unused, report.unused
    hidden, frames = forward(model, jnp.asarray(values), jnp.asarray(mask))

    assert frames.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(frames), ref_frames)
    assert ref_frames.sum(-1).tolist() == [model.conv_output_length(n) for n in LENGTHS]
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=1e-4, rtol=0)


def test_old_weight_norm_names_and_bin_file(tmp_path):
    hf_model = tiny_hf_model("stable", seed=3)
    save_old_style(hf_model, tmp_path / "old")
    values, mask = padded_batch(seed=4)
    ref_hidden, _ = hf_forward(hf_model, values, mask)

    model, report = load_hubert(tmp_path / "old")
    assert "encoder.pos_conv_embed.conv.weight_g" in report.loaded and not report.unused
    hidden, _ = forward(model, jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=1e-4, rtol=0)


def test_without_attention_mask_matches_hf(tmp_path):
    hf_model = tiny_hf_model("post_norm", seed=5)
    hf_model.save_pretrained(tmp_path)
    values = np.random.default_rng(6).standard_normal((2, 1_000)).astype(np.float32)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(values)).last_hidden_state.numpy()
    model, _ = load_hubert(tmp_path)
    hidden, frames = forward(model, jnp.asarray(values))
    assert bool(frames.all()) and frames.shape == ref.shape[:2]
    np.testing.assert_allclose(np.asarray(hidden), ref, atol=1e-4, rtol=0)


def test_head_prefixed_checkpoint_loads(tmp_path):
    hf_model = tiny_hf_model("post_norm", seed=7)
    state = {f"hubert.{k}": v.contiguous() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = torch.zeros(3, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    values, mask = padded_batch(seed=8)
    ref_hidden, _ = hf_forward(hf_model, values, mask)
    model, report = load_hubert(tmp_path)
    assert report.unused == ["lm_head.weight"]
    hidden, _ = forward(model, jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=1e-4, rtol=0)


def test_encoder_layer_alone_matches_hf_with_key_mask():
    """The post-norm layer the audio bridge reuses, with an additive key mask, against HF's layer."""
    hf_config = transformers.HubertConfig(**TINY, **VARIANTS["post_norm"])
    hf_config._attn_implementation = "eager"
    torch.manual_seed(9)
    hf_layer = transformers.models.hubert.modeling_hubert.HubertEncoderLayer(hf_config).eval()
    with torch.no_grad():
        for p in hf_layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer = HubertEncoderLayer(HubertConfig.from_hf(hf_config.to_dict()), rngs=nnx.Rngs(0))
    tensors = ((k, v.numpy()) for k, v in hf_layer.state_dict().items())
    report = hf_io.assign(layer, tensors, make_key_map(ENCODER_LAYER_RULES))
    assert not report.unused and not report.missing

    x = np.random.default_rng(10).standard_normal((2, 7, 32)).astype(np.float32)
    valid = np.array([[1] * 7, [1] * 4 + [0] * 3], dtype=bool)
    bias = key_mask_bias(jnp.asarray(valid))
    with torch.no_grad():
        ref = hf_layer(torch.from_numpy(x), attention_mask=torch.from_numpy(np.array(bias))).numpy()
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x), attention_bias=bias)), ref, atol=1e-5, rtol=0)


def test_sharded_forward_equals_single_device(tmp_path, devices):
    hf_model = tiny_hf_model("stable", seed=11)
    hf_model.save_pretrained(tmp_path)
    values, mask = padded_batch(seed=12)
    single, _ = load_hubert(tmp_path)
    ref_hidden, ref_frames = forward(single, jnp.asarray(values), jnp.asarray(mask))

    mesh = sharding.make_mesh((2, 2, 2))
    model, _ = load_hubert(tmp_path, mesh=mesh)
    kernel = model.encoder.layers.attention.q_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # stacked layers
    with jax.set_mesh(mesh):
        batch = jax.device_put((values, mask), sharding.batch_sharding(mesh, 2))
        hidden, frames = forward(model, *batch)
    np.testing.assert_array_equal(np.asarray(frames), np.asarray(ref_frames))
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5, rtol=0)


def test_paper_scale_config_builds_abstractly():
    hf = presets.get("hubert", "hubert-large")
    config = HubertConfig.from_hf(hf)
    assert config.conv_output_length(192_000) == 599
    model = nnx.eval_shape(lambda: HubertModel(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        reference = transformers.HubertModel(transformers.HubertConfig(**hf))
    assert ours == sum(p.numel() for p in reference.parameters())
    assert 315e6 < ours < 318e6
    assert int(reference._get_feat_extract_output_lengths(torch.tensor(192_000))) == 599


def test_config_round_trips_through_hf():
    config = HubertConfig.from_hf(presets.get("hubert", "hubert-large"))
    assert HubertConfig.from_hf(transformers.HubertConfig(**config.to_hf()).to_dict()) == config
