"""The per-op breakdown of a compiled TPU program: a hand-written module by hand, a scanned step against its
unrolled self (the TPU compiler needs libtpu, as in test_aot_tpu.py)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from xemogpt_jax import aot_check, hlo_ops

# A compiled module's text, cut down; long instructions run over several lines, as a Pallas kernel's do.
MODULE = """HloModule step

%fused_matmul (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %convolution = bf16[8,8]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf
}

%fused_add (p0: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  ROOT %add = bf16[8,8]{1,0} add(%p0, %p0)
}

%body (state: (s32[], bf16[8,8])) -> (s32[], bf16[8,8]) {
  %state = (s32[], bf16[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = bf16[8,8]{1,0} get-tuple-element(%state), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one), backend_config={"estimated_cycles":"2"}
  %mm = bf16[8,8]{1,0} fusion(%x, %x), kind=kOutput, calls=%fused_matmul,
metadata={op_name="jit(step)/jvp()/while/body/closed_call/dot_general"},
backend_config={"window_config":{"estimated_cycles":"100"}}
  ROOT %out = (s32[], bf16[8,8]{1,0}) tuple(%next, %mm)
}

%condition (state: (s32[], bf16[8,8])) -> pred[] {
  %state = (s32[], bf16[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %stop = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %stop), direction=LT
}

%other_condition (state: (s32[], bf16[8,8])) -> pred[] {
  %state = (s32[], bf16[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  ROOT %odd = pred[] compare(%i, %i), direction=NE
}

ENTRY %main (x: bf16[8,8]) -> bf16[8,8] {
  %x = bf16[8,8]{1,0} parameter(0)
  %start = s32[] constant(1)
  %init = (s32[], bf16[8,8]{1,0}) tuple(%start, %x)
  %loop = (s32[], bf16[8,8]{1,0}) while(%init), condition=%condition, body=%body
  %again = (s32[], bf16[8,8]{1,0}) while(%loop), condition=%other_condition, body=%body
  %y = bf16[8,8]{1,0} get-tuple-element(%again), index=1
  %kernel = bf16[8,8]{1,0} custom-call(%y), custom_call_target="tpu_custom_call",
metadata={op_name="jit(step)/jvp()/shard_map/pallas_call"}
  ROOT %sum = bf16[8,8]{1,0} fusion(%kernel), kind=kLoop, calls=%fused_add,
metadata={op_name="jit(step)/transpose(jvp())/add"}, backend_config={"estimated_cycles":"60"}
}
"""


def test_a_hand_written_module_is_broken_down_by_hand():
    breakdown = hlo_ops.op_costs(MODULE)
    rows = {(hlo_ops.short_source(row.source), row.kind, row.shape): (row.cycles, row.runs) for row in breakdown.rows}
    # the first loop runs 5 - 1 = 4 times; the second's condition is no counter: its body is counted once
    assert rows == {("forward/dot_general", "matmul", "bf16[8,8]"): (500, 5),
                    ("backward/add", "elementwise/reduce", "bf16[8,8]"): (60, 1),
                    ("(unnamed)", "elementwise/reduce", "s32[]"): (10, 5)}
    assert [hlo_ops.short_source(row.source) for row in breakdown.rows][0] == "forward/dot_general"
    assert breakdown.unknown_trips == ["again"]
    assert breakdown.unestimated == {"Pallas kernel": 1}
    text = "\n".join(hlo_ops.report(MODULE, 2))
    assert "  87.7%  matmul" in text  # 500 of 570 cycles
    assert "largest 2 of 3 source ops" in text and "1 Pallas kernel call(s)" in text and "again" in text


def test_a_program_without_per_op_estimates_says_so():
    assert hlo_ops.report("HloModule m\n\nENTRY %main () -> f32[] {\n  ROOT %c = f32[] constant(1)\n}\n", 5) == [
        "no per-op estimate in this program (the TPU compiler writes one: --target tpu:<topology>)"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_a_scanned_step_is_broken_down_as_its_unrolled_self_every_layer_counted():
    devices = aot_check.target_devices(aot_check.parse_target("tpu:v5e:2x2"))
    mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,), devices=devices)
    layers, batch, width = 4, 4096, 2048

    def forward_matmuls(unrolled: bool) -> hlo_ops.OpCost:
        def loss(weights, x):
            x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, weights, unroll=unrolled)
            return jnp.sum(x.astype(jnp.float32))

        weights = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
        x = jax.ShapeDtypeStruct((batch, width), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
        text = jax.jit(jax.grad(loss)).lower(weights, x).compile().as_text()
        (row,) = [row for row in hlo_ops.op_costs(text).rows
                  if row.kind == "matmul" and hlo_ops.short_source(row.source) == "forward/dot_general"]
        return row

    scanned, unrolled = forward_matmuls(False), forward_matmuls(True)
    assert scanned.instructions == 1 and unrolled.instructions == layers  # one body op, run once per layer
    assert scanned.runs == unrolled.runs == layers
    assert scanned.cycles == pytest.approx(unrolled.cycles, rel=0.05)
