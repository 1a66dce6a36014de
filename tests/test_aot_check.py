"""tools/aot_check.py compiles the paper-scale stage-3 step on 8 fake CPU devices and reports memory."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from xemogpt_jax import aot_check
from xemogpt_jax.models.layers import remat_policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_aot_check_compiles_the_paper_scale_step_and_reports_memory():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "aot_check.py"), "--config", str(ROOT / "configs" / "sft.py"),
         "--mesh", "2,4", "--batch-size", "8", "--seq-len", "512", "--audio-seconds", "2", "--cost", "once"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "mesh (data, fsdp, tensor) = (2, 4, 1)" in out
    total, trainable = re.search(r"parameters: ([\d.]+) B total, ([\d.]+) M trainable", out).groups()
    assert 4.5 < float(total) < 5.5  # Qwen3-4B + CLIP-L vision + HuBERT-L + bridges
    assert 250 < float(trainable) < 400  # LoRA r=512 on q,k,v of 36 layers + bridges + projections
    arguments = float(re.search(r"arguments \(state \+ batch\)\s+([\d.]+) GiB", out).group(1))
    peak = float(re.search(r"peak ~ .* = ([\d.]+) GiB", out).group(1))
    # fp32 weights of ~5 B parameters sharded 4 ways by fsdp is ~4.6 GiB per device before activations
    assert 3.5 < arguments < 12 and peak > arguments
    # FLOPs count every one of the 36 scanned layers: at least the LLM's forward and input-gradient matmuls,
    # 3 x 2 x 3.6 B non-embedding parameters x 4096 tokens = 89 TFLOP (one layer's worth would be 2.5)
    step_tflop = float(re.search(r"step FLOPs .*: ([\d.]+) TFLOP,", out).group(1))
    assert 89 < step_tflop < 200


def test_depth_extrapolation_equals_the_fully_unrolled_cost():
    """Identical layers add identical cost: a 4-layer LLM costed from copies 1 and 2 layers deep matches the step
    compiled with all of its layers unrolled. Stage 3 builds no CLIP text tower: its depth is traced, not costed.
    The loss runs in 4 chunks, unrolled too: every chunk counted, the FLOPs of the loss in one piece."""
    from xemogpt_jax import aot_check, config_files, run_config

    config = config_files.load("configs/sft.py:tiny")
    config.model.loss_chunk = 96
    run_config.set_architecture(config, "llm", num_hidden_layers=4)
    text_tower = {**run_config.architecture(config, "clip")["text_config"], "num_hidden_layers": 3}
    run_config.set_architecture(config, "clip", text_config=text_tower)
    target = aot_check.parse_target("cpu:8")  # the suite's 8 host devices (conftest); one device compiles fastest
    mesh = aot_check.make_mesh(target, aot_check.target_devices(target)[:1], (1, 1, 1))

    def build(variant):
        return aot_check.build_step(variant, mesh, 2, 384)

    assert {(s.part, s.path, s.layers) for s in aot_check.layer_stacks(config)} == {
        ("llm", (), 4), ("clip", ("text_config",), 3)}
    extrapolated = aot_check.depth_extrapolated_cost(config, build, mesh, target)
    unrolled = build(aot_check.unrolled_copy(config))
    full = aot_check.cost_of(aot_check.compile_variant(unrolled, None, True, mesh, target))
    assert full.loops == 0 and extrapolated.loops == 0
    assert extrapolated.flops == pytest.approx(full.flops, rel=1e-3)
    assert extrapolated.bytes_accessed == pytest.approx(full.bytes_accessed, rel=2e-2)
    config.model.loss_chunk = 384
    one_chunk = aot_check.cost_of(aot_check.compile_variant(build(aot_check.unrolled_copy(config)), None, True, mesh,
                                                            target))
    assert full.flops == pytest.approx(one_chunk.flops, rel=1e-3)


def test_flops_xla_cannot_see_set_the_roofline_floor_and_the_printed_mfu_without_them(capsys):
    """A splash step: XLA counts 1 of the 3 TFLOP per chip it runs (the rest are a Pallas kernel's)."""
    target = aot_check.parse_target("tpu:v5e:2x2")
    peak = target.chip.peak_bf16_flops
    cost = aot_check.Cost(flops=1e12, bytes_accessed=1e6, seconds=0.02, loops=0)
    assert cost.unseen_flops(3e12) == 2e12 and cost.unseen_flops(0.5e12) == 0
    assert cost.roofline_seconds(target.chip, traced_flops=3e12) == pytest.approx(3e12 / peak)
    aot_check.print_estimate(cost, aot_check.StepFlops(executed=4 * 3e12, model=4 * 3e12), target=target, n=4)
    out = capsys.readouterr().out
    assert f"MFU (compiler estimate): {100 * 3e12 / 0.02 / peak:.1f}%" in out
    note = re.search(r"note: XLA counts ([\d.]+) TFLOP per chip fewer .* add ([\d.]+) ms: MFU ([\d.]+)%", out)
    assert note, out
    assert float(note[1]) == 2 and float(note[2]) == pytest.approx(1e3 * 2e12 / peak, abs=0.05)
    assert float(note[3]) == pytest.approx(100 * 3e12 / (0.02 + 2e12 / peak) / peak, abs=0.05)


def test_mfu_counts_the_model_flops_and_remat_recomputation_only_in_the_hardware_figure(capsys):
    """A remat step runs 4 of 3 TFLOP per chip: MFU counts the 3, the hardware utilisation the 4, and the
    Pallas FLOPs XLA cannot see are what it runs beyond its 1."""
    target = aot_check.parse_target("tpu:v5e:2x2")
    peak = target.chip.peak_bf16_flops
    cost = aot_check.Cost(flops=1e12, bytes_accessed=1e6, seconds=0.02, loops=0)
    aot_check.print_estimate(cost, aot_check.StepFlops(executed=4 * 4e12, model=4 * 3e12), target=target, n=4)
    out = capsys.readouterr().out
    assert "step FLOPs (matmuls and convolutions, every layer counted): 12 TFLOP, 3 TFLOP per chip; " \
           "1 TFLOP per chip more recomputed by remat" in out
    assert f"MFU (compiler estimate): {100 * 3e12 / 0.02 / peak:.1f}%" in out
    assert f"(hardware FLOP utilisation): {100 * 4e12 / 0.02 / peak:.1f}%" in out
    assert "XLA counts 3 TFLOP per chip fewer" in out


def test_step_flops_leave_out_what_remat_recomputes_by_hand():
    """grad of sum(tanh(x @ w) @ w) runs 5 matmuls of [32,64] x [64,64]: the forward's 2, then the backward's
    activation gradient and two weight gradients. Rematerialised, the backward reruns x @ w (tanh's input;
    the second product is not needed again): 6. MFU's FLOPs are the 5."""
    unit = 2 * 32 * 64 * 64
    w, x = jnp.ones((64, 64)), jnp.ones((32, 64))

    def build(config: ml_collections.ConfigDict) -> SimpleNamespace:
        def loss(w: jax.Array, x: jax.Array) -> jax.Array:
            return jnp.sum(jnp.tanh(x @ w) @ w)

        enabled, policy = remat_policy(config.model.remat)
        if enabled:
            loss = jax.checkpoint(loss, policy=policy)
        return SimpleNamespace(jitted=jax.jit(jax.grad(loss)), args=(w, x))

    mesh = jax.make_mesh((1,), ("data",))
    config = ml_collections.ConfigDict({"model": {"remat": "full", "remat_towers": "none"}})
    assert aot_check.step_flops(build(config), build, config, mesh) == aot_check.StepFlops(6 * unit, 5 * unit)
    config.model.remat = "none"
    assert aot_check.step_flops(build(config), build, config, mesh) == aot_check.StepFlops(5 * unit, 5 * unit)
