"""xemogpt-aot --target tpu:<topology>: every stage compiles with libtpu's TPU compiler on this CPU host (with
splash attention in every model part on one target), its figures are consistent, the step-time estimate
counts every scanned layer, --infer and --search work, and errors are one line.

Needs libtpu (the ``tpu`` extra, which ``make test`` installs); skipped without it. Every figure here is a
compiler estimate. The compiles run in this process (one libtpu start), each stage once per target (a
module fixture that several tests read), and are the slow part.
"""

import contextlib
import functools
import importlib.util
import io
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from xemogpt_jax import aot_check, cli_checks, config_files

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
    # FLOPs XLA does not see (a Pallas kernel's) raise the roofline when the traced count is higher
    assert cost.roofline_seconds(V5E, traced_flops=3 * flops) == pytest.approx(3 * flops / V5E.peak_bf16_flops)


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
        "peak": re.search(rf"peak ~ .* = {number} GiB = ", out),
        "step_ms": re.search(rf"step time \((?:compiler estimate|lower bound)[^)]*\): {number} ms", out),
        "traced_tflop": re.search(rf"step FLOPs .*: {number} TFLOP,", out),
        "xla_tflop": re.search(rf"per-chip cost \(compiler estimate\): {number} TFLOP", out),
    }
    missing = [name for name, match in found.items() if match is None]
    assert not missing, f"{missing} not in:\n{out}"
    values = {name: float(match.group(1)) for name, match in found.items()}
    # an MFU only from XLA's estimate of a step that counts every loop iteration (from a time that counts loop
    # bodies once, or from the roofline's lower bound, it would be too high)
    mfu = re.search(rf"MFU \(compiler estimate\): {number}%", out)
    assert (mfu is None) == ("each loop body counted once" in out or "lower bound, not an estimate" in out), out
    if mfu:
        values["mfu"] = float(mfu.group(1))
    return values


class Logged(logging.Handler):
    """The attention module's log lines (which kernel each model part runs)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def small_flags(config: str) -> list[str]:
    """The smallest shapes a tiny config takes (1 row per batch shard, 1 s of audio, the first length bucket):
    the TPU compiler's time grows with them."""
    flags = ["--batch-size", "4"] + ([] if config.startswith("align_video") else ["--audio-seconds", "1"])
    return flags + (["--seq-len", "384"] if config.startswith("sft") else [])


STAGES = ["align_video.py:tiny", "align_audio.py:tiny", "sft.py:tiny"]
# Each stage compiles once per target. v5e:2x2: data and tensor axes, splash attention in every model part
# (Pallas kernels through Mosaic inside shard_map); stage 3's scans are costed from its unrolled step (a second
# compile; the method is the same for every stage). v5p:2x2x2: all three axes, the default attention (auto).
SPLASH = ["--set", "model.attention=splash", "--set", "model.splash_block_q=128", "--set", "model.splash_block_kv=128"]
TARGETS = {"v5e": ("tpu:v5e:2x2", "2,1,2", SPLASH), "v5p": ("tpu:v5p:2x2x2", "2,2,2", [])}


def stage_flags(config: str, target: str) -> list[str]:
    name, mesh, extra = TARGETS[target]
    unrolled = [] if config.startswith("sft") and target == "v5e" else ["--cost", "once"]
    return ["--config", f"configs/{config}", "--target", name, "--mesh", mesh, *small_flags(config), *extra, *unrolled,
            "--ops", "5"]


@pytest.fixture(scope="module")
def stage_runs():
    """(stage, target) -> (exit status, stdout, stderr, attention log lines): one compile per stage and target."""
    runs = {}
    for config in STAGES:
        for target in TARGETS:
            runs[config, target] = captured(stage_flags(config, target))
    return runs


def captured(argv: list[str]) -> tuple[int, str, str, list[str]]:
    """``xemogpt-aot`` in this process (one libtpu start for the module): exit status, stdout, stderr, logs."""
    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("xemogpt_jax.models.attention")
    handler, level = Logged(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = aot_check.main(argv)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return rc, out.getvalue(), err.getvalue(), handler.lines


@pytest.mark.slow
@pytest.mark.parametrize("config", STAGES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_stage_compiles_for_tpu_topologies_with_consistent_figures(config, target, stage_runs):
    rc, out, err, _ = stage_runs[config, target]
    assert rc == 0, err[-3000:]
    assert "libtpu" not in err and "TPU_WORKER_HOSTNAMES" not in err, err[-2000:]
    values = figures(out)
    assert all(value > 0 for value in values.values()), values
    assert values["peak"] >= values["arguments"] and values["peak"] >= values["temporaries"]
    assert values.get("mfu", 0) < 100
    assert "batch (from the stage's collate)" in out
    # the per-op breakdown (tests/test_hlo_ops.py) of the program as compiled: its matmuls among the kinds
    breakdown = out.split("where the time goes")[1]
    assert re.search(r"\n +[\d.]+%  matmul\n", breakdown) and "largest 5 of" in breakdown, breakdown
    mesh = tuple(int(n) for n in TARGETS[target][1].split(","))
    assert f"mesh (data, fsdp, tensor) = {mesh}" in out
    # every stage scans its encoder (and stage 3 its LLM) layers, so the step as compiled has loops
    if "once" in stage_flags(config, target):
        assert "loop(s) whose bodies XLA counts once" in out, out
    else:
        assert "cost from the step compiled again with its loops unrolled" in out, out
        # a tensor split gets sliced prefetches, for which XLA's cost model gives no time unless they are off
        assert "(XLA's optimal_seconds)" in out and "MFU (compiler estimate)" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("config", STAGES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_stage_compiles_with_splash_attention_in_every_part(config, target, stage_runs):
    """v5e sets splash; on v5p ``model.attention=auto`` is resolved for the target (what a TPU run picks), not
    for this CPU host."""
    rc, _, err, logs = stage_runs[config, target]
    assert rc == 0, err[-3000:]
    assert "attention: encoder runs splash" in logs, logs
    assert not [line for line in logs if "runs" in line and not line.endswith("splash")], logs
    if config.startswith("sft"):
        assert "attention: llm runs splash" in logs, logs


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


def test_a_peak_over_the_hbm_says_by_how_much_and_what_to_try():
    target = aot_check.parse_target("tpu:v5e:2x2")
    memory = aot_check.Memory(arguments=10 * 2**30, outputs=2 * 2**30, aliased=2 * 2**30, temporaries=7 * 2**30)
    with pytest.raises(cli_checks.UsageError) as error:
        aot_check.check_fits(memory, target)
    assert "peak 17.00 GiB per chip is 1.00 GiB over the 16 GiB HBM of a TPU v5e" in str(error.value)
    assert "--mesh" in str(error.value) and "model.remat" in str(error.value)


def test_flag_mistakes_are_one_line(capsys):
    base = ["--config", "configs/sft.py:tiny", "--target", "tpu:v5e:2x2"]
    assert "FIELD=VALUE" in one_line_error([*base, "--set", "model.no_such_field=1"], capsys)
    assert "--set model.loss_chunk: 0 is not a number" in one_line_error([*base, "--set", "model.loss_chunk=0"], capsys)
    assert "configs/sft.py" in one_line_error(["--config", "configs/align_audio.py:tiny", "--infer"], capsys)
    assert "--target tpu:" in one_line_error(["--config", "configs/sft.py:tiny", "--target", "cpu:4", "--search"],
                                             capsys)
    assert "--ops -1" in one_line_error([*base, "--ops", "-1"], capsys)
    assert "--ops and --search" in one_line_error([*base, "--ops", "5", "--search"], capsys)


# ------------------------------------------------------------------ --infer and --search


@pytest.mark.slow
def test_a_loop_free_program_with_sliced_prefetches_gets_xlas_time_from_a_whole_prefetch_compile():
    """Stage 1 unrolled, fsdp 4: no loops, but memory-space assignment slices its prefetches, for which XLA's
    cost model gives no time; the cost comes from a second compile that prefetches whole."""
    rc, out, err, _ = captured(["--config", "configs/align_video.py:tiny", "--set", "model.unroll_layers=True",
                                "--target", "tpu:v5e:2x2", "--mesh", "1,4,1"])
    assert rc == 0, err[-3000:]
    assert "loop(s)" not in out and "cost from the program compiled again prefetching whole" in out, out
    assert "(XLA's optimal_seconds)" in out and "MFU (compiler estimate)" in out, out


@pytest.mark.slow
def test_infer_compiles_the_prefill_and_a_decode_step_greedy_and_with_beams(capsys):
    rc = aot_check.main(["--config", "configs/sft.py:tiny", "--target", "tpu:v5e:2x2", "--mesh", "4,1,1",
                         "--infer", "--batch-size", "4", "--audio-seconds", "1", "--max-new-tokens", "16",
                         "--cost", "once"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    sections = out.split("\n\n")[1:]
    names = [section.splitlines()[0] for section in sections[:3]]
    assert names[0].startswith("prefill (4 clips x 384 prompt positions)"), names
    assert names[1] == "decode step, greedy (4 rows, cache of 400)", names
    assert names[2] == "decode step, 5 beams (20 rows, 16 own slots each, a 384-slot prompt per clip)", names
    for section in sections[:3]:
        values = figures(section)  # a tiny decode step's temporaries and MFU may print as 0.000 / 0.0
        assert all(values[name] > 0 for name in ("arguments", "step_ms", "traced_tflop", "xla_tflop")), values
        assert values["peak"] >= values["arguments"] and values.get("mfu", 0) < 100
    greedy, beams = figures(sections[1]), figures(sections[2])
    assert beams["traced_tflop"] == pytest.approx(5 * greedy["traced_tflop"], rel=0.05)  # 5 x the rows
    assert "largest peak:" in out


def launch_command(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.strip().startswith("tools/launch_tpu_pod.sh"))
    return shlex.split(line)


@pytest.mark.slow
def test_search_ranks_the_fitting_layouts_and_its_choice_launches_as_printed(capsys, tmp_path):
    rc = aot_check.main(["--config", "configs/align_video.py:tiny", "--target", "tpu:v5e:2x2", "--search",
                         "--search-meshes", "4,1,1;2,2,1", "--search-remat-towers", "none", "--search-batch", "1",
                         "--cost", "once"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d,\d,\d\s", line)]
    assert len(rows) == 2, out  # 2 meshes x 1 batch, both small enough to fit
    rates = [float(row[9]) for row in rows]
    assert rates == sorted(rates, reverse=True) and all(rate > 0 for rate in rates)
    best_mesh, best_batch = rows[0][1], int(rows[0][4])

    # The launcher passes the printed overrides to xemogpt_jax.train unchanged (gcloud stubbed to echo them).
    stub = tmp_path / "gcloud"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in --command=*) echo "${a#--command=}";; esac; done\n')
    stub.chmod(0o755)
    command = launch_command(out)
    assert command[:6] == ["tools/launch_tpu_pod.sh", "train", "TPU_NAME", "ZONE", "configs/align_video.py:tiny",
                           "gs://BUCKET/RUN"]
    root = Path(__file__).resolve().parents[1]
    launched = subprocess.run(["bash", *command], capture_output=True, text=True, cwd=root, timeout=60,
                              env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert launched.returncode == 0, launched.stderr
    train_argv = shlex.split(launched.stdout.split("&&", 1)[1])
    assert train_argv[:3] == [".venv/bin/python", "-m", "xemogpt_jax.train"]
    # xemogpt_jax.train's flag parsing (absl's config_flags) reads the layout back from those arguments
    script = ("import sys; from absl import flags; from ml_collections import config_flags; "
              "c = config_flags.DEFINE_config_file('config'); flags.FLAGS(sys.argv); v = c.value; "
              "print(','.join(map(str, v.mesh.shape)), v.data.batch_size, v.model.remat_towers)")
    parsed = subprocess.run([sys.executable, "-c", script, *[a for a in train_argv[3:] if a.startswith("--config")]],
                            capture_output=True, text=True, cwd=root, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert parsed.stdout.split() == [best_mesh, str(best_batch), "none"], parsed.stderr[-2000:]


def score_buffers(attention: str) -> set[str]:
    """The ``[..., T, T]`` arrays (T = 512) of the tiny stage-3 train step as the TPU compiler emits it for v5e:2x2."""
    config = config_files.load("configs/sft.py:tiny")
    config.model.attention = attention
    config.dtype = "bfloat16"
    target = aot_check.parse_target("tpu:v5e:2x2")
    mesh = aot_check.make_mesh(target, aot_check.target_devices(target), (1, 4, 1))
    # the matmul precision a TPU run has (conftest asks for "highest", which Mosaic refuses on bf16 operands)
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        step = aot_check.build_step(config, mesh, 8, 512)
        text = step.jitted.lower(*step.args).compile().as_text()
    return {f"{dtype}[{dims}]" for dtype, dims in re.findall(r"\b(f32|bf16)\[([\d,]+)\]", text)
            if dims.endswith(",512,512")}


@pytest.mark.slow
def test_no_attention_score_buffer_survives_in_the_splash_step():
    """Mixed precision with splash: no ``[B, H, T, S]`` scores, fp32 or bf16, in the compiled bf16 stage-3 step;
    with ``xla`` attention the same search finds them (so it can see them)."""
    assert score_buffers("splash") == set()
    assert {buffer for buffer in score_buffers("xla") if buffer.startswith("f32")}


def test_the_tpu_compiler_slices_stacked_layers_in_place_so_decoding_keeps_them_stacked_there():
    """``generate``'s whole program (prefill and while_loop) for one v5e chip, with the layers stacked as
    ``prepare_for_decoding`` leaves them on a TPU: the slices it takes before the loop hold no copy of the layers
    (temporaries under half their bytes), where XLA's CPU plan holds all of them again (tests/test_generate.py,
    which is why the CPU rule unstacks)."""
    from flax import nnx

    from xemogpt_jax import generate, sharding
    from xemogpt_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

    mesh = sharding.make_mesh((1, 1, 1), devices=aot_check.target_devices(aot_check.parse_target("tpu:v5e:2x2"))[:1])
    config = Qwen3Config(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                         rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=True)

    def build() -> Qwen3ForCausalLM:
        model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
        generate.prepare_for_decoding(model, "tpu")
        return model

    model = nnx.eval_shape(build)
    assert not isinstance(model.layers, nnx.List)
    whole = NamedSharding(mesh, P())
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=whole), state)
    prompt = jax.ShapeDtypeStruct((2, 64, 256), jnp.float32, sharding=whole)
    mask = jax.ShapeDtypeStruct((2, 64), jnp.int32, sharding=whole)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=whole)
    decoding = generate.GenerationConfig(max_new_tokens=8, eos_token_id=(1,), pad_token_id=0)
    with jax.set_mesh(mesh):
        compiled = generate._generate_jit.lower(graphdef, state, None, prompt, mask, key, decoding, None).compile()
    layer_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(model.layers)))
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes / 2
