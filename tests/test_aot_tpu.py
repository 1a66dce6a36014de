"""xemogpt-aot --target tpu:<topology>: every stage compiles with libtpu's TPU compiler on this CPU host, its
figures are consistent, the step-time estimate counts every scanned layer, and errors are one line.

Needs libtpu (the ``tpu`` extra, which ``make test`` installs); skipped without it. Every figure here is a
compiler estimate. The stage compiles run in this process (one libtpu start) and are the slow part.
"""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from xemogpt_jax import aot_check, cli_checks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]')")

V5E = aot_check.CHIPS["v5e"]


def topology_mesh(topology: str, shape: tuple[int, ...], names: tuple[str, ...]):
    devices = aot_check.target_devices(aot_check.parse_target(f"tpu:{topology}"))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def test_the_estimate_of_a_sharded_matmul_is_its_hand_computed_roofline():
    mesh = topology_mesh("v5e:2x2", (4,), ("x",))
    m = k = n = 8192  # compute-bound on a v5e: 2 m k n / 4 FLOPs against (m k / 4 + k n + m n / 4) bf16 values
    rows, whole = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P())
    a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=rows)
    b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=whole)
    compiled = jax.jit(lambda a, b: a @ b, out_shardings=rows).lower(a, b).compile()
    cost = aot_check.cost_of(compiled)
    flops = 2 * m * k * n / 4
    hand = max(flops / V5E.peak_bf16_flops, (m * k / 4 + k * n + m * n / 4) * 2 / V5E.hbm_bytes_per_second)
    assert cost.flops == flops and cost.loops == 0
    assert cost.roofline_seconds(V5E) == pytest.approx(hand)
    assert hand <= cost.seconds <= 1.3 * hand  # XLA's optimal_seconds: the roofline plus some overhead


def test_a_scanned_model_is_costed_as_its_unrolled_self_every_layer_counted():
    mesh = topology_mesh("v5e:2x2", (4,), ("x",))
    layers, batch, width = 2, 4096, 2048  # larger shapes make the TPU compiler slower (autotuning)

    @functools.cache
    def compile_step(unrolled: bool):
        def loss(weights, x):
            x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, weights, unroll=unrolled)
            return jnp.sum(x.astype(jnp.float32))

        weights = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
        x = jax.ShapeDtypeStruct((batch, width), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
        return jax.jit(jax.grad(loss)).lower(weights, x).compile()

    scanned = aot_check.cost_of(compile_step(False))
    unrolled = aot_check.cost_of(compile_step(True))
    cost, used_unrolled = aot_check.scan_free_cost(compile_step)
    # per layer: forward x @ w, backward dL/dw; and dL/dx for every layer but the first: 3 L - 1 matmuls
    matmul = 2 * (batch / 4) * width * width
    hand_flops = (3 * layers - 1) * matmul
    assert scanned.loops > 0 and unrolled.loops == 0 and used_unrolled
    assert scanned.flops == pytest.approx(3 * matmul, rel=0.01)  # each loop body (forward, backward) once
    assert cost == unrolled
    assert cost.flops == pytest.approx(hand_flops, rel=0.01)
    # the roofline's compute side by hand; the memory side needs XLA's byte count of the fused backward
    hand_seconds = hand_flops / V5E.peak_bf16_flops
    assert cost.roofline_seconds(V5E) >= hand_seconds * 0.99
    assert hand_seconds <= cost.seconds <= 2.5 * hand_seconds, cost.seconds / hand_seconds


def figures(out: str) -> dict[str, float]:
    number = r"([\d.]+(?:e[-+]?\d+)?)"
    found = {
        "arguments": re.search(rf"arguments \(state \+ batch\)\s+{number} GiB", out),
        "temporaries": re.search(rf"temporaries\s+{number} GiB", out),
        "peak": re.search(rf"peak ~ .* = {number} GiB = {number}% of the 16 GiB HBM|peak ~ .* = {number} GiB = ", out),
        "step_ms": re.search(rf"step time \(compiler estimate\): {number} ms", out),
        "mfu": re.search(rf"MFU \(compiler estimate\): {number}%", out),
        "traced_tflop": re.search(rf"step FLOPs .*: {number} TFLOP,", out),
        "xla_tflop": re.search(rf"per-chip cost \(compiler estimate\): {number} TFLOP", out),
    }
    missing = [name for name, match in found.items() if match is None]
    assert not missing, f"{missing} not in:\n{out}"
    return {name: float(next(g for g in match.groups() if g is not None)) for name, match in found.items()}


STAGES = ["align_video.py:tiny", "align_audio.py:tiny", "sft.py:tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("config", STAGES)
@pytest.mark.parametrize("target, mesh, extra", [
    ("tpu:v5e:2x2", "4,1,1", []),  # data parallel; sft's layer scan is costed from the unrolled step
    ("tpu:v5p:2x2x2", "2,2,2", ["--no-unrolled-cost"]),  # all three axes (one compile per stage, to keep it short)
])
def test_every_stage_compiles_for_tpu_topologies_with_consistent_figures(config, target, mesh, extra, capsys):
    # the smallest shapes the tiny configs take (1 row per batch shard, 1 s of audio, the first length bucket):
    # the TPU compiler's time grows with them
    small = ["--batch-size", "4"] + ([] if config.startswith("align_video") else ["--audio-seconds", "1"])
    small += ["--seq-len", "384"] if config.startswith("sft") else []
    rc = aot_check.main(["--config", f"configs/{config}", "--target", target, "--mesh", mesh, *small, *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "libtpu" not in err and "TPU_WORKER_HOSTNAMES" not in err, err[-2000:]
    values = figures(out)
    assert all(value > 0 for value in values.values()), values
    assert values["peak"] >= values["arguments"] and values["peak"] >= values["temporaries"]
    assert values["mfu"] < 100
    if config.startswith("sft") and not extra:
        assert "cost from the step compiled again with its loops unrolled" in out
    assert "batch (from the stage's collate)" in out


def one_line_error(argv: list[str], capsys) -> str:
    rc = aot_check.main(argv)
    out, err = capsys.readouterr()
    assert rc != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_an_unknown_topology_lists_the_known_ones(capsys):
    for target in ("tpu:v5e:3x3", "tpu:v9:2x2", "gpu:8"):
        line = one_line_error(["--config", "configs/sft.py:tiny", "--target", target], capsys)
        assert "v5e:2x2" in line and "v5p:2x2x2" in line and "v6e:4x4" in line


def test_a_missing_libtpu_says_how_to_install_it(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(aot_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    line = one_line_error(["--config", "configs/sft.py:tiny", "--target", "tpu:v5e:2x2"], capsys)
    assert "pip install -e '.[tpu]'" in line


def test_a_layout_that_does_not_fit_says_by_how_much_and_what_to_try():
    mesh = topology_mesh("v5e:2x2", (4,), ("x",))
    whole = NamedSharding(mesh, P())
    a = jax.ShapeDtypeStruct((8192, 8192), jnp.float32, sharding=whole)
    b = jax.ShapeDtypeStruct((8192, 8192 * 70), jnp.float32, sharding=whole)  # 17.5 GiB on every chip
    with pytest.raises(cli_checks.UsageError) as error:
        aot_check.compile_lowered(lambda: jax.jit(lambda a, b: (a @ b).sum()).lower(a, b))
    message = str(error.value)
    assert re.search(r"does not fit: needs [\d.]+ GiB per chip, [\d.]+ GiB available \([\d.]+ GiB over\)", message)
    assert "--mesh" in message and "--batch-size" in message and "\n" not in message


def test_a_batch_that_does_not_divide_over_the_mesh_is_one_line(capsys):
    line = one_line_error(["--config", "configs/sft.py:tiny", "--target", "tpu:v5e:2x2", "--mesh", "4,1,1",
                           "--batch-size", "6"], capsys)
    assert "try --batch-size 4" in line
