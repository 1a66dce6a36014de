"""The real stage tasks: one sharded train step equals the single-device step; FTD is learnable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import align_audio, align_video, sft
from data_pipelines import synth
from xemogpt_jax import losses, metrics, optim, sharding, stages, trainer
from xemogpt_jax.models import bridges
from xemogpt_jax.models.clip import CLIPEncoderConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth.write_world(out, num_clips=12, seed=3)
    return out


def _config(module, world, **overrides):
    config = module.get_config("tiny")
    config.data.train_dir = str(world / "train")
    config.init_from.tokenizer = str(world / "tokenizer")
    config.data.batch_size = 4
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _step(task, config, mesh, local):
    tx = optim.make_optimizer(config.optim, config.train.steps)
    engine = trainer.build_engine(task, tx, mesh, config.seed)
    with jax.set_mesh(mesh):
        batch = trainer.global_batch(local, mesh, task.pad_values)
        engine.trained, out = engine.step_fn(engine.trained, engine.frozen, batch)
    trained = nnx.to_pure_dict(nnx.state(engine.model(), task.trainable))
    return float(out["loss"]), jax.tree.map(np.asarray, trained)


@pytest.mark.parametrize(
    "module, overrides",
    [
        (align_video, {}),
        (align_audio, {"data.max_audio_seconds": 1.0}),
        (sft, {"data.max_audio_seconds": 1.0, "data.length_buckets": (256, 384, 512)}),
    ],
    ids=["stage1", "stage2", "stage3"],
)
def test_stage_step_on_8_devices_matches_one_device(world, devices, module, overrides):
    config = _config(module, world, **overrides)
    task = stages.task_for(config)
    local = next(task.train_data(0, 1))
    loss_1, params_1 = _step(task, config, sharding.make_mesh((1, 1, 1), devices=devices[:1]), local)
    loss_8, params_8 = _step(task, config, sharding.make_mesh((2, 2, 2)), local)
    assert np.isfinite(loss_1)
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    flat_1 = jax.tree_util.tree_leaves_with_path(params_1)
    flat_8 = dict(jax.tree_util.tree_leaves_with_path(params_8))
    assert len(flat_1) == len(flat_8) > 0
    for path, value in flat_1:
        np.testing.assert_allclose(flat_8[path], value, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_video_bridge_on_8_devices_keeps_each_sample_its_own_attention(devices):
    """CLIP features split over ``tensor`` on their feature axis (where propagation puts them in the stage-1
    step) give the one-device bridge output; unpinned, XLA added samples 1 and 2's attention outputs to
    each other's residuals at the tiny config's width 64."""
    encoder = CLIPEncoderConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    config = bridges.VECBConfig(encoder=encoder, num_layers=2, num_frames=16, align_dim=32, text_dim=32)
    vecb = bridges.VECB(config, rngs=nnx.Rngs(0))
    frames = np.random.default_rng(0).standard_normal((4, 16, 64), dtype=np.float32)
    expected = np.asarray(jax.jit(lambda model, x: model(x))(vecb, frames))
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(vecb)
        sharded = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))
        split_features = jax.device_put(frames, jax.NamedSharding(mesh, jax.P(None, None, "tensor")))
        replicated = jax.NamedSharding(mesh, jax.P())
        got = jax.jit(lambda model, x: model(x), out_shardings=replicated)(sharded, split_features)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def _trained_names(task):
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(model, task.trainable))
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)}


@pytest.mark.parametrize("module", [align_video, align_audio, sft], ids=["stage1", "stage2", "stage3"])
def test_abstract_batch_is_what_the_pipeline_yields(world, module):
    """aot_check compiles for Task.abstract_batch: the same fields, shapes and dtypes as a real batch."""
    config = _config(module, world, **({"data.max_audio_seconds": 1.0} if module is not align_video else {}))
    task = stages.task_for(config)
    local = next(task.train_data(0, 1))
    width = local["token_ids"].shape[1] if "token_ids" in local else None
    abstract = task.abstract_batch(config.data.batch_size, width)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in local.items()}


@pytest.mark.parametrize("train_encoders", [False, True])
def test_stage3_trains_only_adapters_projections_and_bridge_layers(world, train_encoders):
    config = _config(sft, world, **{"model.lora.rank": 8, "model.train_encoders": train_encoders})
    names = _trained_names(stages.task_for(config))
    assert any("lora_a" in n for n in names) and any("visual_llm_project" in n for n in names)
    assert any("visual_alignment_layer" in n for n in names) and any("audio_alignment_layer" in n for n in names)
    for frozen in ("embed_tokens", "temporal_disc_head", "frame_reconstructor"):
        assert not any(frozen in n for n in names), frozen
    for tower in ("vision_tower", "audio_tower"):
        assert any(n.startswith(f"['{tower}']") for n in names) == train_encoders, tower


@pytest.mark.parametrize(
    "module, towers",
    [
        (align_video, ("['clip']['vision_model']", "['clip']['text_model']")),
        (align_audio, ("['hubert']", "['text_encoder']")),
    ],
    ids=["stage1", "stage2"],
)
def test_bridge_stages_train_their_towers_only_when_asked(world, module, towers):
    for train_encoders in (False, True):
        names = _trained_names(stages.task_for(_config(module, world, **{"model.train_encoders": train_encoders})))
        for tower in towers:
            assert any(n.startswith(tower) for n in names) == train_encoders, (tower, train_encoders)


def test_frame_temporal_discrimination_is_learnable():
    """A few hundred steps on synthetic frame features separate original from shuffled order."""
    frames, width = 8, 32
    config = bridges.VECBConfig(
        encoder=CLIPEncoderConfig(hidden_size=width, intermediate_size=64, num_attention_heads=4),
        num_layers=1, num_frames=frames, align_dim=width, text_dim=width,
    )
    vecb = bridges.VECB(config, rngs=nnx.Rngs(0))

    def clips(key, batch):
        start, drift, noise = jax.random.split(key, 3)
        t = jnp.arange(frames, dtype=jnp.float32)[None, :, None]
        return (jax.random.normal(start, (batch, 1, width))
                + t * jax.random.normal(drift, (batch, 1, width))
                + 0.1 * jax.random.normal(noise, (batch, frames, width)))

    def logits(model, x, key):
        order = losses.shuffled_frame_order(key, x.shape[0], frames)
        original = model.temporal_logit(model.video_embedding(model(x)))
        shuffled = model.temporal_logit(model.video_embedding(model(x, frame_order=order)))
        return original, shuffled

    def loss_fn(model, x, key):
        return losses.frame_temporal_discrimination(*logits(model, x, key))

    optimizer = nnx.Optimizer(vecb, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        data_key, shuffle_key = jax.random.split(key)
        loss, grads = nnx.value_and_grad(loss_fn)(model, clips(data_key, 32), shuffle_key)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(0)
    first = None
    for step in range(300):
        loss = float(train_step(vecb, optimizer, jax.random.fold_in(key, step)))
        first = loss if first is None else first
    original, shuffled = logits(vecb, clips(jax.random.key(99), 256), jax.random.key(100))
    accuracy = (float(jnp.mean(original > 0)) + float(jnp.mean(shuffled < 0))) / 2
    assert first > 0.6 and accuracy > 0.9, (first, loss, accuracy)


def test_mfu_flops_are_the_step_without_remat_recomputation_counted_once(world, devices):
    """The trainer's FLOPs for MFU equal the traced step of the same model built without remat (a second code
    path), and are fewer than the remat step runs."""
    mesh = sharding.make_mesh((1, 1, 1), devices=devices[:1])
    overrides = {"data.max_audio_seconds": 1.0, "data.length_buckets": (256, 384, 512)}
    flops = {}
    for remat in ("full", "none"):
        config = _config(sft, world, **overrides, **{"model.remat": remat, "model.remat_towers": remat})
        task = stages.task_for(config)
        local = next(task.train_data(0, 1))
        engine = trainer.build_engine(task, optim.make_optimizer(config.optim, config.train.steps), mesh, config.seed)
        with jax.set_mesh(mesh):
            batch = trainer.global_batch(local, mesh, task.pad_values)
            flops[remat] = (trainer.step_flops(engine, task.loss, batch, config, tokens=1),
                            metrics.traced_flops(engine.step_fn, engine.trained, engine.frozen, batch))
    assert flops["full"][0] == flops["none"][0] == flops["none"][1] < flops["full"][1]
