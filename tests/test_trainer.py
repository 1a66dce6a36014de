"""The training loop on a stand-in task: sharding invariance, optimizer state, checkpoints, resume, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tests import toy_training as toy
from xemogpt_jax import checkpoint, optim, sharding, trainer

ROOT = Path(__file__).resolve().parents[1]
RUNNER = [sys.executable, str(ROOT / "tests" / "toy_training.py")]


def _engine(config, mesh):
    tx = optim.make_optimizer(config.optim, config.train.steps)
    return trainer.build_engine(toy.toy_task(config), tx, mesh, config.seed)


def _one_step(config, mesh, local_batch):
    engine = _engine(config, mesh)
    with jax.set_mesh(mesh):
        engine.trained, out = engine.step_fn(engine.trained, engine.frozen, trainer.global_batch(local_batch, mesh))
    return float(out["loss"]), toy.flat_arrays(nnx.state(engine.model(), toy.TRAINABLE))


def test_sharded_step_matches_one_device(devices):
    config = toy.toy_config(steps=10)
    batch = next(toy.toy_data(8, 0, 1, seed=0))
    loss_1, params_1 = _one_step(config, sharding.make_mesh((1, 1, 1), devices=devices[:1]), batch)
    loss_8, params_8 = _one_step(config, sharding.make_mesh((2, 2, 2)), batch)
    np.testing.assert_allclose(loss_8, loss_1, atol=1e-5)
    assert params_1.keys() == params_8.keys()
    for name in params_1:
        np.testing.assert_allclose(params_8[name], params_1[name], atol=1e-5, err_msg=name)


def test_optimizer_state_covers_only_trainable_params(devices):
    engine = _engine(toy.toy_config(steps=10), sharding.make_mesh((2, 2, 2)))
    trainable = nnx.state(engine.model(), toy.TRAINABLE)
    n_trainable = len(jax.tree.leaves(trainable))
    opt_leaves = jax.tree.leaves(engine.trained["optimizer"]["opt_state"])
    # clip_by_global_norm keeps no state; AdamW keeps mu and nu per trainable leaf, plus a step count.
    assert len([x for x in opt_leaves if np.ndim(x) > 0 or x.dtype != np.int32]) >= 2 * n_trainable
    assert "frozen_encoder" not in json.dumps(jax.tree_util.tree_map(lambda _: 0, nnx.to_pure_dict(engine.trained)))
    assert "frozen_encoder" in nnx.to_pure_dict(engine.frozen)["model"]


def test_weight_decay_mask_spares_norms_biases_and_tables():
    state = nnx.state(toy.ToyModel(nnx.Rngs(0)))
    mask = nnx.to_pure_dict(optim.decay_mask(state))
    assert mask["hidden"]["kernel"] and mask["out"]["kernel"]
    assert not mask["hidden"]["bias"] and not mask["norm"]["scale"]
    assert not mask["position_table"] and not mask["logit_scale"]


def test_checkpoint_restores_onto_other_meshes_and_training_continues(tmp_path, devices):
    config = toy.toy_config(steps=4, mesh=(2, 4, 1))
    trainer.run(config, tmp_path, toy.toy_task(config))
    written = toy.load_final(config, tmp_path)
    for mesh in (sharding.make_mesh((8, 1, 1)), sharding.make_mesh((1, 1, 1), devices=devices[:1])):
        engine = _engine(config, mesh)
        ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=2, keep=2, keep_best=False, async_save=False)
        step, restored, data_state = ckpt.restore(None, trainer.abstract_trained(engine))
        ckpt.close()
        trainer.restore_into(engine, restored)
        assert step == 4 and data_state is not None
        got = toy.flat_arrays(nnx.state(engine.model(), toy.TRAINABLE))
        leaf = jax.tree.leaves(nnx.state(engine.model(), toy.TRAINABLE))[0]
        assert leaf.sharding.mesh.shape == mesh.shape
        for name in written:
            np.testing.assert_array_equal(got[name], written[name], err_msg=name)
    more = toy.toy_config(steps=6, mesh=(8, 1, 1))
    record = trainer.run(more, tmp_path, toy.toy_task(more), mesh=sharding.make_mesh((1, 1, 1), devices=devices[:1]))
    assert np.isfinite(record["train/loss"])
    assert checkpoint.Checkpointer(
        tmp_path / "checkpoints", every_steps=2, keep=2, keep_best=False, async_save=False
    ).latest_step() == 6


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, devices):
    config = toy.toy_config(steps=8, mesh=(2, 2, 2))
    task = toy.toy_task(config, nan_at_step=5)
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan at step 5.*Last good checkpoint: step 4"):
        trainer.run(config, tmp_path, task)
    params = toy.load_final(config, tmp_path)
    assert all(np.all(np.isfinite(v)) for v in params.values())
    assert checkpoint.restore_config(tmp_path / "checkpoints")["train"]["steps"] == 8


def _wait_for_step(workdir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    log = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists():
            lines = log.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        if process.poll() is not None:
            raise AssertionError(f"runner exited with {process.returncode} before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
def test_interrupted_runs_resume_to_the_same_parameters(tmp_path):
    """SIGKILL and SIGTERM at three different steps each, restarting every time: same final parameters."""
    steps = 14
    args = ["--steps", str(steps), "--devices", "2", "--mesh", "2,1,1", "--every", "2"]
    reference = subprocess.Popen([*RUNNER, "--workdir", str(tmp_path / "reference"), *args])
    interrupted = tmp_path / "interrupted"
    rng = np.random.default_rng(int(time.time()))
    kill_steps = sorted(rng.choice(np.arange(2, steps - 1), size=6, replace=False).tolist())
    for kill_at, sig in zip(kill_steps, [signal.SIGKILL, signal.SIGTERM] * 3):
        process = subprocess.Popen([*RUNNER, "--workdir", str(interrupted), *args])
        _wait_for_step(interrupted, kill_at, process)
        process.send_signal(sig)
        code = process.wait(timeout=120)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), (sig, code)
    subprocess.run([*RUNNER, "--workdir", str(interrupted), *args], check=True, timeout=300)
    assert reference.wait(timeout=300) == 0
    want = np.load(tmp_path / "reference" / "final_params.npz")
    got = np.load(interrupted / "final_params.npz")
    assert sorted(want.files) == sorted(got.files)
    for name in want.files:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=f"{name} (interrupted at {kill_steps})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    steps = ["--steps", "4", "--mesh", "4,1,1", "--every", "4"]
    single = subprocess.Popen([*RUNNER, "--workdir", str(tmp_path / "one"), "--devices", "4", *steps])
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = [
        subprocess.Popen(
            [*RUNNER, "--workdir", str(tmp_path / "two"), "--devices", "2", "--processes", "2",
             "--process-id", str(i), "--coordinator", coordinator, *steps],
            env=env,
        )
        for i in range(2)
    ]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    assert single.wait(timeout=300) == 0

    def losses(workdir: Path) -> list[float]:
        return [json.loads(line)["train/loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5)
    assert len(losses(tmp_path / "one")) == 4
