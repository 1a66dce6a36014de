"""CLIP towers against HF transformers' CLIPModel (tiny random models saved locally), sharding, paper scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from xemogpt_jax import loading, sharding
from xemogpt_jax.models import clip_params, presets
from xemogpt_jax.models.clip import (
    CLIPConfig,
    CLIPEncoderLayer,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from xemogpt_jax.models.clip_params import hf_key_for, key_map

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=97,
    pad_token_id=0,
)
EOS = 98


def load_clip(path):
    return loading.from_hf(clip_params.hf_factory(path), path, clip_params.key_map)


def load_clip_vision(path, mesh=None, dtype=None):
    return loading.from_hf(clip_params.vision_factory(path, dtype=dtype), path, clip_params.vision_key_map, mesh)


def tiny_hf_clip(eos_token_id: int) -> transformers.CLIPModel:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(TINY_TEXT, eos_token_id=eos_token_id), vision_config=TINY_VISION, projection_dim=16
    )
    return transformers.CLIPModel(config).eval()


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    model = tiny_hf_clip(EOS)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return model, path


def pixels(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def padded_text(end_token: int, body_low: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows of unequal lengths: BOS, body tokens in [body_low, 97), ``end_token``, then padding."""
    rng = np.random.default_rng(1)
    lengths = [5, 9, 3]
    ids = np.zeros((len(lengths), 10), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 0] = 97
        ids[row, 1 : n - 1] = rng.integers(body_low, 97, n - 2)
        ids[row, n - 1] = end_token
        mask[row, :n] = 1
    return ids, mask


vision_forward = nnx.jit(lambda model, images: model(images))


def assert_close(ours, theirs, atol=1e-4):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=atol, rtol=0)


def test_vision_tower_matches_hf(hf_clip_dir):
    hf, path = hf_clip_dir
    model, report = load_clip(path)
    assert not report.missing
    images = pixels()
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
        image_features = hf.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    out = vision_forward(model.vision_model, jnp.asarray(images))
    assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert_close(out.pooler_output, expected.pooler_output)
    assert_close(out.cls_token, expected.last_hidden_state[:, 0])
    features = nnx.jit(lambda m, x: m.get_image_features(x))(model, jnp.asarray(images))
    assert_close(features, image_features.pooler_output)


# first_eos: EOS=50 is never the largest id, so the legacy argmax rule would pool elsewhere.
# legacy_argmax: config eos_token_id=2 means "pool at the largest id", here the final 98.
@pytest.mark.parametrize(
    ("eos_token_id", "end_token", "body_low"), [(50, 50, 51), (2, EOS, 3)], ids=["first_eos", "legacy_argmax"]
)
def test_text_features_match_hf_on_padded_batch(tmp_path, eos_token_id, end_token, body_low):
    hf = tiny_hf_clip(eos_token_id)
    hf.save_pretrained(tmp_path)
    model, _ = load_clip(tmp_path)
    ids, mask = padded_text(end_token, body_low)
    with torch.no_grad():
        expected = hf.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    text, features = nnx.jit(lambda m, i, a: (m.text_model(i, a), m.get_text_features(i, a)))(
        model, jnp.asarray(ids), jnp.asarray(mask)
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(text.last_hidden_state)[valid], expected.last_hidden_state.numpy()[valid], atol=1e-4, rtol=0
    )
    assert_close(features, expected.pooler_output)


def test_vision_only_directory_loads_the_tower(tmp_path):
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).eval()
    hf.save_pretrained(tmp_path)
    model, report = load_clip_vision(tmp_path)
    assert isinstance(model, CLIPVisionModel) and not report.missing
    images = pixels(2)
    with torch.no_grad():
        expected = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    out = vision_forward(model, jnp.asarray(images))
    assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert_close(out.pooler_output, expected.pooler_output)


def test_key_map_is_invertible_and_covers_every_parameter(hf_clip_dir):
    hf, _ = hf_clip_dir
    hf_params = dict(hf.named_parameters())
    model = nnx.eval_shape(lambda: CLIPModel(CLIPConfig.from_hf(hf.config.to_dict()), rngs=nnx.Rngs(0)))
    names = {}  # HF key -> (our path, slot of the stacked encoder layers)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        slots = range(variable.get_value().shape[0]) if "layers" in path else [None]
        names.update({hf_key_for(path, index)[0]: (path, index) for index in slots})
    assert sorted(names) == sorted(hf_params)
    assert all((key_map(name).path, key_map(name).index) == slot for name, slot in names.items())


def test_sharded_vision_forward_equals_single_device(hf_clip_dir, devices):
    _, path = hf_clip_dir
    images = pixels(8, seed=2)
    single, _ = load_clip_vision(path)
    expected = np.asarray(vision_forward(single, jnp.asarray(images)).last_hidden_state)

    mesh = sharding.make_mesh((2, 2, 2))
    sharded, _ = load_clip_vision(path, mesh=mesh)
    assert sharded.encoder.layers.mlp.fc1.kernel[...].sharding.spec == P(None, "fsdp", "tensor")  # stacked layers
    with jax.set_mesh(mesh):
        batch = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        out = vision_forward(sharded, batch).last_hidden_state
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32(hf_clip_dir):
    _, path = hf_clip_dir
    fp32, _ = load_clip_vision(path)
    bf16, _ = load_clip_vision(path, dtype=jnp.bfloat16)
    assert bf16.encoder.layers.mlp.fc1.kernel[...].dtype == jnp.float32
    images = jnp.asarray(pixels(2))
    out = vision_forward(bf16, images).last_hidden_state
    assert out.dtype == jnp.bfloat16
    reference = vision_forward(fp32, images).last_hidden_state
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference), atol=0.1, rtol=0.02)


def test_encoder_layer_applies_the_attention_bias():
    layer = nnx.eval_shape(lambda: CLIPEncoderLayer(CLIPVisionConfig(**TINY_VISION), rngs=nnx.Rngs(5)))
    rng = np.random.default_rng(6)
    for _, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        variable.set_value(jnp.asarray(rng.standard_normal(variable.get_value().shape) * 0.2, jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 4, 32)), jnp.float32)
    # Blocking key 3 for every query must equal running the first three tokens alone.
    bias = jnp.where(jnp.arange(4) < 3, 0.0, -1e9)[None, None, None, :]
    apply = nnx.jit(lambda layer, x, bias: layer(x, bias))
    np.testing.assert_allclose(
        np.asarray(apply(layer, x, bias)[:, :3]), np.asarray(apply(layer, x[:, :3], None)), atol=1e-5, rtol=0
    )


def test_paper_scale_clip_builds_abstractly_with_hf_parameter_count():
    published = presets.get("clip", "clip-vit-l14")
    config = CLIPConfig.from_hf(published)
    model = nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        hf = transformers.CLIPModel(transformers.CLIPConfig(**published))
    assert ours == sum(p.numel() for p in hf.parameters())
    assert 427e6 < ours < 429e6
