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
        ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=2, keep=2, keep_best=False,
                                       async_save=False)
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


class SigtermAt:
    """A data iterator that sends this process SIGTERM when it hands out its ``at``-th batch of this run."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.count = inner, at, 0

    def __next__(self):
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _single_device_reference(config, workdir: Path, devices) -> dict[str, np.ndarray]:
    mesh = sharding.make_mesh((1, 1, 1), devices=devices[:1])
    trainer.run(config, workdir, toy.toy_task(config), mesh=mesh)
    return toy.load_final(config, workdir, mesh)


def test_sigterm_saves_and_resume_reaches_the_same_parameters(tmp_path, devices):
    """SIGTERM at three different steps, restarting each time, ends where an uninterrupted run ends."""
    config = toy.toy_config(steps=10, every=3, evaluate=False)
    mesh = sharding.make_mesh((1, 1, 1), devices=devices[:1])
    want = _single_device_reference(config, tmp_path / "reference", devices)
    stops = []
    for at in (2, 3, 2):  # stops at steps 2, 5 and 7
        task = toy.toy_task(config)
        make = task.train_data
        task.train_data = lambda p, n, make=make, at=at: SigtermAt(make(p, n), at)
        trainer.run(config, tmp_path / "interrupted", task, mesh=mesh)
        stops.append(checkpoint.Checkpointer(
            tmp_path / "interrupted" / "checkpoints", every_steps=3, keep=2, keep_best=False, async_save=False
        ).latest_step())
    assert len(set(stops)) == 3 and max(stops) < 10, stops  # each SIGTERM stopped the run early, at a new step
    trainer.run(config, tmp_path / "interrupted", toy.toy_task(config), mesh=mesh)
    got = toy.load_final(config, tmp_path / "interrupted", mesh)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_sigkill_at_random_steps_and_resume_reaches_the_same_parameters(tmp_path, devices):
    """SIGKILL (no chance to save) at three random steps; each restart resumes from the last checkpoint."""
    config = toy.toy_config(steps=10, mesh=(1, 1, 1), every=2, evaluate=False)
    want = _single_device_reference(config, tmp_path / "reference", devices)
    args = ["--steps", "10", "--devices", "1", "--mesh", "1,1,1", "--every", "2", "--no-eval"]
    interrupted = tmp_path / "interrupted"
    kill_steps = sorted(np.random.default_rng().choice(np.arange(2, 9), size=3, replace=False).tolist())
    for kill_at in kill_steps:
        process = subprocess.Popen([*RUNNER, "--workdir", str(interrupted), *args])
        _wait_for_step(interrupted, kill_at, process)
        process.kill()
        assert process.wait(timeout=120) == -signal.SIGKILL
    subprocess.run([*RUNNER, "--workdir", str(interrupted), *args], check=True, timeout=300)
    got = np.load(interrupted / "final_params.npz")
    assert sorted(got.files) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=f"{name} (killed at {kill_steps})")


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


def test_checkpoints_store_init_from_paths_absolute(tmp_path, monkeypatch, devices):
    """Frozen weights are re-read from ``init_from`` at load time, whatever the loader's working directory."""
    monkeypatch.chdir(tmp_path)
    config = toy.toy_config(steps=2, mesh=(1, 1, 1))
    config.init_from.clip = "towers/clip"
    config.init_from.model = "gs://bucket/model"
    config.init_from.llm = ""
    trainer.run(config, tmp_path / "run", toy.toy_task(config), mesh=sharding.make_mesh((1, 1, 1), devices=devices[:1]))
    stored = checkpoint.restore_config(tmp_path / "run" / "checkpoints")["init_from"]
    assert stored == {"clip": str(tmp_path / "towers" / "clip"), "model": "gs://bucket/model", "llm": ""}
