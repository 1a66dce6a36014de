"""Compile a stage's train step ahead of time for fake CPU devices or a TPU topology, allocating no weight.

``xemogpt-aot --config configs/sft.py --target tpu:v5e:4x4 --mesh 1,16,1`` (or ``python tools/aot_check.py
...``) builds the stage's train state abstractly (``nnx.eval_shape``), gives every leaf the sharding of the
(data, fsdp, tensor) mesh, takes the global batch's fields, shapes and dtypes from the stage's own collate
(:attr:`xemogpt_jax.trainer.Task.abstract_batch`), lowers the jitted step for ShapeDtypeStruct inputs and
compiles it with XLA's compiler for the target: ``cpu:N`` (N host CPU devices) or ``tpu:<topology>`` (the TPU
compiler in libtpu, run on this host: no TPU needed). It prints, per device (per chip on TPU):

- memory: arguments, outputs, temporaries and their peak, against the chip's HBM (:data:`CHIPS`);
- cost: XLA's FLOPs and bytes, its estimated step time (``optimal_seconds``, TPU only) and the MFU that time
  implies for our traced FLOPs (:func:`xemogpt_jax.metrics.traced_flops`) at the chip's bf16 peak; MFU counts
  the step traced without remat (:func:`step_flops`), the FLOPs remat recomputes only in the hardware figure.

``--infer`` compiles inference instead (:mod:`xemogpt_jax.aot_infer`: the prefill and a decode step), and
``--search`` ranks layouts (:mod:`xemogpt_jax.aot_search`: meshes, remat, batch) by estimated tokens/s per chip.

Every figure is a compiler estimate, not a measurement. XLA's cost analysis counts a loop body once, so a
step whose layers run under ``lax.scan`` (LLM, CLIP, HuBERT) would show one layer's cost: when it has a loop,
its cost comes from other compiles (``--cost``), while its memory comes from the step as configured:

- ``unrolled`` (default): the step compiled again with the layer scans unrolled (``model.unroll_layers``);
  :func:`scan_free_cost`, checked against a hand-computed roofline in tests/test_aot_tpu.py;
- ``depth``: unrolled copies with every layer stack (:data:`LAYER_STACKS`) one layer deep, then one stack at a
  time two deep, extrapolated linearly to the real depths (:func:`depth_extrapolated_cost`): the layers of a
  stack are identical, so each adds the same cost. At paper scale a few shallow compiles take minutes where
  the unrolled 84-layer step takes far longer; tests check it against the full unrolled compile.

``--mesh`` takes 2 or 3 entries (tensor defaults to 1; default: the config's ``mesh.shape``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from xemogpt_jax.cli_checks import UsageError, command

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # dense bf16 matmul FLOP/s per chip
    hbm_bytes_per_second: float


# Per chip, from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e: "HBM capacity", "Peak compute per chip (bf16)", "HBM bandwidth").
CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9),
}
# Topologies that libtpu 0.0.42 compiles for on a CPU host here (any "<chip>:<AxB[xC]>" it accepts works).
KNOWN_TOPOLOGIES = ("v5e:2x2", "v5e:4x4", "v5p:2x2x2", "v6e:2x4", "v6e:4x4")
INSTALL_TPU = "pip install -e '.[tpu]'"


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str  # "cpu" | "tpu"
    count: int = 0  # cpu
    topology: str = ""  # tpu
    chip: Chip | None = None

    @property
    def unit(self) -> str:
        return "chip" if self.kind == "tpu" else "device"


def parse_target(text: str) -> Target:
    kind, _, rest = text.partition(":")
    if kind == "cpu" and rest.isdigit() and int(rest) > 0:
        return Target("cpu", count=int(rest))
    if kind == "tpu" and rest:
        generation = rest.split(":")[0]
        if generation not in CHIPS:
            raise UsageError(f"--target {text}: unknown TPU topology; known: {', '.join(KNOWN_TOPOLOGIES)} "
                           f"(chips: {', '.join(CHIPS)})")
        return Target("tpu", topology=rest, chip=CHIPS[generation])
    raise UsageError(f"--target {text}: expected cpu:N or tpu:<topology> (known: {', '.join(KNOWN_TOPOLOGIES)})")


def target_devices(target: Target) -> list[Any]:
    """The target's devices: host CPUs, or a TPU topology's device descriptions (compile-only)."""
    import jax

    if target.kind == "cpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", target.count)
        return jax.devices()[: target.count]
    if importlib.util.find_spec("libtpu") is None:
        raise UsageError(f"--target tpu:{target.topology} needs libtpu, which is not installed: {INSTALL_TPU}")
    # libtpu would otherwise ask a metadata server (absent off Cloud) for the host's TPU and workers.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling touches no chip, so another process's libtpu (a second xemogpt-aot, or a parallel test worker)
    # need not lock this one out.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies

    try:
        with quiet_stderr():  # libtpu logs that it found no TPU on this host; the topology needs none
            topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
    except Exception as error:  # noqa: BLE001 - libtpu's errors are one RuntimeError type
        if "not installed" in str(error):
            raise UsageError(f"--target tpu:{target.topology}: JAX finds no TPU support: {INSTALL_TPU}") from None
        reason = str(error).strip().splitlines()[0]
        raise UsageError(f"--target tpu:{target.topology}: unknown TPU topology ({reason}); "
                       f"known: {', '.join(KNOWN_TOPOLOGIES)}") from None
    return list(topology.devices)


class quiet_stderr:
    """Send file descriptor 2 (where libtpu's C++ logs go) to /dev/null for a block."""

    def __enter__(self) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc: Any) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)


def make_mesh(target: Target, devices: list[Any], shape: tuple[int, ...]):
    import jax

    from xemogpt_jax import sharding

    shape = sharding.resolve_mesh_shape(shape, len(devices))
    if target.kind == "tpu":  # jax.make_mesh lays the axes along the topology's physical links
        axis_types = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
        return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=axis_types, devices=devices)
    return sharding.make_mesh(shape, devices)


# ------------------------------------------------------------------ compile and read XLA's figures


@dataclasses.dataclass(frozen=True)
class Memory:
    arguments: int
    outputs: int
    aliased: int
    temporaries: int

    @property
    def peak(self) -> int:
        """Live at once: inputs, outputs not written over donated inputs, and temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float  # per device
    bytes_accessed: float  # per device
    seconds: float | None  # XLA's estimated run time (TPU's optimal_seconds; None where it gives none)
    loops: int  # while loops in the compiled program (their bodies are counted once)

    def unseen_flops(self, traced_flops: float) -> float:
        """Of the step's matmul FLOPs per chip (``traced_flops``), those XLA's count leaves out: a Pallas
        kernel's, which it cannot see (splash attention is a custom call to one)."""
        return max(0.0, traced_flops - self.flops)

    def roofline_seconds(self, chip: Chip, traced_flops: float = 0.0) -> float:
        """The roofline of XLA's counts plus the FLOPs it cannot see: the slower of the chip's bf16 matmul
        peak and its HBM bandwidth."""
        flops = self.flops + self.unseen_flops(traced_flops)
        return max(flops / chip.peak_bf16_flops, self.bytes_accessed / chip.hbm_bytes_per_second)


def memory_of(compiled: Any) -> Memory | None:
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return Memory(memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                  memory.temp_size_in_bytes)


def cost_of(compiled: Any) -> Cost:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    seconds = analysis.get("optimal_seconds")
    loops = len(re.findall(r"\bwhile\(", compiled.as_text()))
    return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)),
                float(seconds) if seconds is not None and seconds > 0 else None, loops)


def compile_lowered(lower: Callable[[], Any], options: dict[str, Any] | None = None) -> Any:
    """``lower().compile(options)``, with the TPU compiler's out-of-memory turned into one line."""
    try:
        return lower().compile(compiler_options=options or None)
    except Exception as error:  # noqa: BLE001
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        needed = re.search(r"\(([\d.]+)([GM])\) exceeds available HBM \(([\d.]+)([GM])\)", text)
        if needed:
            scale = {"G": 1.0, "M": 1 / 1024}
            need, have = float(needed[1]) * scale[needed[2]], float(needed[3]) * scale[needed[4]]
            amount = f"needs {need:.2f} GiB per chip, {have:.2f} GiB available ({need - have:.2f} GiB over)"
        else:
            amount = text.strip().splitlines()[0]
        raise UsageError(f"does not fit: {amount}; {REMEDIES}") from None


REMEDIES = ("try more fsdp (--mesh 1,N,1), a larger topology, a smaller --batch-size or --seq-len, "
            "or model.remat")


# The TPU SPMD partitioner turns an all-gather or reduce-scatter around a matmul into a loop ("windowed
# einsum", under fsdp), whose body the cost analysis would count once. For the cost compiles it keeps the
# plain collective instead: the same matmuls and bytes, no loop. (Unrolling those loops,
# xla_tpu_spmd_unroll_windowed_einsum, keeps the overlap too, but at paper scale with fsdp 16 that compile
# did not finish in 20 minutes, where this one takes about as long as the step as configured.)
# Memory-space assignment may also split a prefetch into async slices joined by a ``ConcatBitcast`` custom
# call; XLA's TPU cost model then gives no step time at all (``optimal_seconds`` -1: seen under fsdp and
# tensor splits, and in stage 1 even data parallel). The cost compiles prefetch whole, and get a time.
COST_COMPILE_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": "false",
                        "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false",
                        "xla_tpu_sliced_prefetch_max_slices": "0"}


def compile_variant(program: Any, unrolled_program: Callable[[], Any] | None, unrolled: bool, mesh: Any,
                    target: Target) -> Any:
    """``program`` compiled as configured, or (``unrolled``) the copy ``unrolled_program`` builds with its layer
    scans unrolled (``program`` itself where there is none), compiled with :data:`COST_COMPILE_OPTIONS` on a TPU."""
    import jax

    chosen = unrolled_program() if unrolled and unrolled_program is not None else program
    options = COST_COMPILE_OPTIONS if unrolled and target.kind == "tpu" else {}
    with jax.set_mesh(mesh):
        return compile_lowered(chosen.lower, options)


# Where a stage config keeps the depth of each stack of identical layers: ``model.<part>``'s HF fields, under
# these keys, hold ``num_hidden_layers``. A stage that does not build a stack (stage 3 has no CLIP text tower)
# traces the same FLOPs at any of its depths, and the stack is left out.
LAYER_STACKS = (("llm", ()), ("clip", ("vision_config",)), ("clip", ("text_config",)), ("hubert", ()),
                ("text_encoder", ()))
COST_METHODS = ("unrolled", "depth", "once")


@dataclasses.dataclass(frozen=True)
class LayerStack:
    part: str
    path: tuple[str, ...]
    layers: int


def layer_stacks(config: Any) -> list[LayerStack]:
    """The config's stacks of more than two layers (shallower ones cost as little unrolled as at depth 1-2)."""
    from xemogpt_jax import run_config

    stacks = []
    for part, path in LAYER_STACKS:
        if part not in config.model:
            continue
        node = run_config.architecture(config, part)
        for key in path:
            node = node.get(key) or {}
        if node.get("num_hidden_layers", 0) > 2:
            stacks.append(LayerStack(part, path, node["num_hidden_layers"]))
    return stacks


def at_depths(config: Any, depths: dict[LayerStack, int]) -> Any:
    """An unrolled copy of ``config`` with each stack of ``depths`` that many layers deep."""
    from xemogpt_jax import run_config

    variant = config.copy_and_resolve_references()
    variant.model.unroll_layers = True
    for stack, layers in depths.items():
        fields = run_config.architecture(variant, stack.part)
        node = fields
        for key in stack.path:
            node = node[key]
        node["num_hidden_layers"] = layers
        if variant.init_from.get(stack.part):  # its config.json would win over model.<part>; no weight is read
            variant.init_from[stack.part] = ""
        del variant.model[stack.part]  # a preset name is a string field; ConfigDict refuses to retype it in place
        variant.model[stack.part] = fields
    return variant


def traced(program: Any, mesh: Any) -> float:
    """The matmul FLOPs of a built program (``.jitted``, ``.args``), traced on ``mesh``, every layer counted."""
    import jax

    from xemogpt_jax import metrics

    with jax.set_mesh(mesh):
        return metrics.traced_flops(program.jitted, *program.args)


def depth_extrapolated_cost(config: Any, build: Callable[[Any], Any], mesh: Any, target: Target) -> Cost:
    """The cost of ``config``'s program, every layer counted, from shallow unrolled copies (module docstring).

    ``build(config)`` returns the program (``.lower()``, ``.jitted``, ``.args``). With every stack 1 layer
    deep the program costs ``base``; one stack 2 deep adds that stack's per-layer cost, counted
    ``layers - 1`` more times. XLA's estimated time is extrapolated the same way.
    """
    def compiled_cost(program: Any, what: str) -> Cost:
        start = time.perf_counter()
        cost = cost_of(compile_variant(program, None, True, mesh, target))
        print(f"  {what}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        return cost

    shallow = {stack: 1 for stack in layer_stacks(config)}
    program = build(at_depths(config, shallow))
    base, base_flops = compiled_cost(program, "every stack 1 layer deep"), traced(program, mesh)
    flops, accessed, seconds, loops = base.flops, base.bytes_accessed, base.seconds, base.loops
    for stack in shallow:
        program = build(at_depths(config, {**shallow, stack: 2}))
        if traced(program, mesh) == base_flops:
            continue
        deeper = compiled_cost(program, f"{'.'.join((stack.part, *stack.path))} 2 layers deep")
        extra = stack.layers - 1
        flops += extra * (deeper.flops - base.flops)
        accessed += extra * (deeper.bytes_accessed - base.bytes_accessed)
        if seconds is not None and deeper.seconds is not None:
            seconds += extra * (deeper.seconds - base.seconds)
        else:
            seconds = None
        loops = max(loops, deeper.loops)
    return Cost(flops, accessed, seconds, loops)


def loop_free_cost(compiled: Any, program: Any, build: Callable[[Any], Any], config: Any, method: str, mesh: Any,
                   target: Target) -> tuple[Cost, str]:
    """The cost of ``compiled`` (``program`` as ``config`` builds it) with every loop iteration counted, by
    ``method`` (:data:`COST_METHODS`), and which method gave it: ``once`` where nothing else was compiled."""
    as_configured = cost_of(compiled)
    if method == "once":
        return as_configured, "once"
    if not as_configured.loops:  # a TPU program may still lack XLA's time (see COST_COMPILE_OPTIONS)
        if as_configured.seconds is None and target.kind == "tpu":
            return cost_of(compile_variant(program, None, True, mesh, target)), "whole"
        return as_configured, "once"
    if method == "depth" and "unroll_layers" in config.get("model", {}):
        return depth_extrapolated_cost(config, build, mesh, target), "depth"
    unrolled_config = unrolled_copy(config)

    def compile_step(unrolled: bool) -> Any:
        rebuild = None if unrolled_config is None else (lambda: build(unrolled_config))
        return compile_variant(program, rebuild, unrolled, mesh, target)

    cost, _ = scan_free_cost(compile_step, compiled)
    return cost, "unrolled"


def scan_free_cost(compile_step: Callable[[bool], Any], scanned: Any | None = None) -> tuple[Cost, bool]:
    """The cost of a step whose layers may run under ``lax.scan``, each layer counted.

    ``compile_step(unrolled)`` compiles the step as configured (False) or with its loops unrolled (True: the
    layer scan, and on TPU without the partitioner's windowed-einsum loops). XLA's cost analysis counts a while
    loop's body once whatever its trip count, so where the compiled step has a loop its cost comes from the
    unrolled compile. Returns (cost, whether the unrolled step was used).
    """
    compiled = scanned if scanned is not None else compile_step(False)
    cost = cost_of(compiled)
    if not cost.loops:
        return cost, False
    return cost_of(compile_step(True)), True


# ------------------------------------------------------------------ the stage's step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sft.py", help="stage config file, optionally with :variant")
    parser.add_argument("--target", default=None,
                        help="cpu:N (N host CPU devices; default N = the mesh's size, else 8) or tpu:<topology> "
                             f"(e.g. {', '.join(KNOWN_TOPOLOGIES)})")
    parser.add_argument("--mesh", default=None, help="data,fsdp[,tensor] (one entry may be -1; default: the config's)")
    parser.add_argument("--seq-len", type=int, default=None, help="stage 3: positions (default: data.max_context)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--audio-seconds", type=float, default=None, help="audio input length (default: the config's)")
    parser.add_argument("--cost", choices=COST_METHODS, default="unrolled",
                        help="where the step has loops (XLA counts a loop body once): compile it again unrolled "
                             "(default), extrapolate from 1- and 2-layer unrolled copies (depth: paper scale in "
                             "minutes), or take the counts as compiled (once)")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="also print the N source ops the TPU compiler estimates take longest, and the split "
                             "by kind of op (matmul, elementwise/reduce, data movement, collective)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.attention=splash (repeatable)")
    parser.add_argument("--infer", action="store_true",
                        help="compile inference instead (stage 3): a full clip prompt's prefill and one decode step "
                             "with the KV cache, greedy and at --beams; --batch-size counts clips")
    parser.add_argument("--beams", type=int, default=5, help="--infer: beams of the beam-search step (release: 5)")
    parser.add_argument("--max-new-tokens", type=int, default=756,
                        help="--infer: KV-cache room for generated tokens (release: 756)")
    parser.add_argument("--search", action="store_true",
                        help="try meshes, remat choices and batches on a TPU target; rank what fits by estimated "
                             "tokens/s per chip and print the layout to launch with")
    parser.add_argument("--search-meshes", default=None,
                        help="--search: data,fsdp,tensor;... (default: every power-of-two split, --search-tensor)")
    parser.add_argument("--search-tensor", default="1,2,4", help="--search: tensor splits to try (default 1,2,4)")
    parser.add_argument("--search-remat", default="full,dots_with_no_batch_dims_saveable",
                        help="--search: model.remat choices for the LLM layers")
    parser.add_argument("--search-remat-towers", default="none",
                        help="--search: model.remat_towers choices for the tower and bridge layers")
    parser.add_argument("--search-batch", default="1,2,4", help="--search: rows per data x fsdp shard to try")
    return parser.parse_args(argv)


def mesh_shape_of(args: argparse.Namespace, config: Any) -> tuple[int, ...]:
    text = args.mesh or ",".join(str(s) for s in config.mesh.shape)
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--mesh {text}: expected 2 or 3 integers, e.g. 2,4 or 1,16,1") from None
    if len(shape) not in (2, 3):
        raise UsageError(f"--mesh {text}: expected 2 or 3 entries (data, fsdp[, tensor])")
    return shape + (1,) * (3 - len(shape))


def default_target(shape: tuple[int, ...]) -> str:
    return f"cpu:{math.prod(shape)}" if -1 not in shape else "cpu:8"


@dataclasses.dataclass
class Step:
    jitted: Any
    trained: Any
    frozen: Any
    batch: dict[str, Any]
    total_params: int
    trainable_params: int
    trained_values: int

    @property
    def args(self) -> tuple[Any, ...]:
        return self.trained, self.frozen, self.batch

    def lower(self) -> Any:
        return self.jitted.lower(*self.args)


def build_step(config: Any, mesh: Any, batch_size: int, seq_len: int | None) -> Step:
    """The stage's jitted train step and its abstract, sharded inputs (as ``trainer.run`` builds them)."""
    import jax
    from flax import nnx

    from xemogpt_jax import optim, sharding, stages, trainer

    # Only token ids are read (model config, pad values); no tokenizer files are needed to compile.
    task = stages.task_for(config, SimpleNamespace(eos_token_id=1, pad_token_id=0))
    tx = optim.make_optimizer(config.optim, config.train.steps)

    def factory() -> trainer.TrainState:
        return trainer.TrainState(task.build_model(nnx.Rngs(config.seed)), tx, task.trainable, config.seed)

    abstract = nnx.eval_shape(factory)
    graphdef, frozen, trained = nnx.split(abstract, trainer.frozen_filter(task.trainable), ...)

    def with_shardings(state: Any) -> Any:
        def place(variable: Any) -> Any:
            value = variable.get_value()
            placed = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding.variable_sharding(variable, mesh))
            return variable.replace(placed)

        return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    step = trainer.make_train_step(graphdef, task.loss, task.trainable, frozen, trained, mesh,
                                   optim.learning_rate_at_step(config.optim, config.train.steps))
    batch = {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding.batch_sharding(mesh, len(spec.shape)))
             for name, spec in task.abstract_batch(batch_size, seq_len).items()}

    def count(tree: Any) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    return Step(step, with_shardings(trained), with_shardings(frozen), batch,
                count(nnx.state(abstract.model, nnx.Param)), count(nnx.state(abstract.model, task.trainable)),
                count(trained))


def gib(n: float) -> str:
    return f"{n / GIB:9.3f} GiB"


def print_memory(memory: Memory | None, target: Target) -> None:
    if memory is None:
        print("this backend gives no memory analysis")
        return
    print(f"per-{target.unit} memory (compiler estimate):")
    print(f"  arguments (state + batch) {gib(memory.arguments)}")
    aliased = gib(memory.aliased).strip()
    print(f"  outputs                   {gib(memory.outputs)}  ({aliased} aliased to donated inputs)")
    print(f"  temporaries               {gib(memory.temporaries)}")
    line = f"  peak ~ args + outputs - aliased + temps = {gib(memory.peak).strip()}"
    if target.chip:
        hbm = target.chip.hbm_bytes
        line += f" = {100 * memory.peak / hbm:.1f}% of the {hbm / GIB:g} GiB HBM"
    print(line)


COST_HOW = {
    "unrolled": "the step compiled again with its loops unrolled",
    "depth": "unrolled copies 1 and 2 layers deep, extrapolated to every layer",
    "whole": "the program compiled again prefetching whole (no step time from XLA with sliced prefetches)",
}


def costed(compiled: Any, program: Any, build: Callable[[Any], Any], config: Any, method: str, s: Setup) -> Cost:
    """The compiled program's cost with every loop iteration counted (see :func:`loop_free_cost`), saying how."""
    start = time.perf_counter()
    as_configured = cost_of(compiled)
    if as_configured.loops and method != "once":
        seconds_text = f"{as_configured.seconds * 1e3:.3f} ms" if as_configured.seconds else "none"
        print(f"it has {as_configured.loops} loop(s); XLA's counts with each body once: "
              f"{as_configured.flops / 1e12:.4g} TFLOP per {s.target.unit}, step time {seconds_text}; "
              f"costing it from {COST_HOW[method]}", flush=True)
    cost, how = loop_free_cost(compiled, program, build, config, method, s.mesh, s.target)
    if how != "once":
        why = "" if how == "whole" else ": XLA counts a loop body once"
        print(f"cost from {COST_HOW[how]} ({time.perf_counter() - start:.1f} s){why}")
        if cost.loops:
            print(f"note: {cost.loops} loop(s) remain; XLA counts their bodies once, so the cost figures are low")
    elif cost.loops:
        print(f"note: it has {cost.loops} loop(s) whose bodies XLA counts once; cost figures are low "
              "(--cost unrolled or depth counts every iteration)")
    return cost


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """A step's matmul and convolution FLOPs, every layer counted, two ways."""

    executed: float  # what the chips run, a rematerialised forward counted again (as XLA's count sees it)
    model: float  # what the model needs, each forward once: MFU's FLOPs, by the field's convention


def step_flops(program: Any, build: Callable[[Any], Any], config: Any, mesh: Any) -> StepFlops:
    """The traced FLOPs of ``program`` (``build(config)``) and, where it rematerialises, of a fresh build traced
    without remat (nothing is compiled). Remat trades FLOPs for memory; counting its recomputation would flatter
    the MFU."""
    import jax

    from xemogpt_jax import metrics

    with jax.set_mesh(mesh):
        jaxpr = program.jitted.trace(*program.args).jaxpr
    return StepFlops(metrics.jaxpr_flops(jaxpr), metrics.model_flops(jaxpr, lambda: traced(build(config), mesh)))


def step_seconds(cost: Cost, chip: Chip, traced_flops: float) -> tuple[float, str, bool]:
    """XLA's estimated run time, or where its TPU cost model answers -1 (a program compiled as configured, see
    :data:`COST_COMPILE_OPTIONS`) the roofline of the counts; returns (seconds, how, whether it is only the
    roofline's lower bound)."""
    if cost.seconds is not None:
        return cost.seconds, "XLA's optimal_seconds", False
    return cost.roofline_seconds(chip, traced_flops), (
        f"XLA gives none for this program; roofline of its counts: {chip.peak_bf16_flops / 1e12:g} "
        f"TFLOP/s, {chip.hbm_bytes_per_second / 1e9:g} GB/s"), True


def print_estimate(cost: Cost, flops: StepFlops, target: Target, n: int, tokens: int | None = None) -> float | None:
    """Print the FLOPs, the step time and MFU (TPU only); returns the estimated seconds (None: no estimate)."""
    unit = target.unit
    recomputed = flops.executed - flops.model
    print(f"step FLOPs (matmuls and convolutions, every layer counted): {flops.model / 1e12:.4g} TFLOP, "
          f"{flops.model / n / 1e12:.4g} TFLOP per {unit}"
          + (f"; {recomputed / n / 1e12:.4g} TFLOP per {unit} more recomputed by remat" if recomputed else ""))
    print(f"per-{unit} cost (compiler estimate): {cost.flops / 1e12:.4g} TFLOP (all ops), "
          f"{cost.bytes_accessed / GIB:.4g} GiB accessed")
    if target.chip is None:
        print("step time: this backend gives no estimate (the TPU compiler does: --target tpu:<topology>)")
        return None
    from xemogpt_jax import metrics

    peak = target.chip.peak_bf16_flops
    seconds, how, bound = step_seconds(cost, target.chip, flops.executed / n)
    if cost.loops:  # the time counts each loop body once: too low, and an MFU from it would be too high
        print(f"step time (compiler estimate, each loop body counted once: too low): {seconds * 1e3:.3f} ms ({how})")
        print("MFU: not estimated (the step time above counts each loop body once; --cost unrolled or depth "
              "counts them all)")
        return seconds
    mfu = metrics.mfu(flops.model, seconds, peak, n)
    if bound:  # the roofline ignores communication and every stall: a floor on the time, a ceiling on the MFU
        print(f"step time (lower bound, not an estimate): {seconds * 1e3:.3f} ms ({how})")
        print(f"MFU: not estimated, at most {100 * mfu:.1f}% (from the roofline)")
        return None
    print(f"step time (compiler estimate): {seconds * 1e3:.3f} ms ({how})")
    print(f"MFU (compiler estimate): {100 * mfu:.1f}% = {flops.model / n / 1e12:.4f} TFLOP per chip / "
          f"{seconds * 1e3:.3f} ms / {peak / 1e12:g} TFLOP/s bf16 peak")
    if recomputed:
        print(f"with remat's recomputation counted too (hardware FLOP utilisation): "
              f"{100 * metrics.mfu(flops.executed, seconds, peak, n):.1f}%")
    unseen = cost.unseen_flops(flops.executed / n)
    if unseen:  # their time may be missing from XLA's estimate too
        extra = unseen / peak
        slower = metrics.mfu(flops.model, seconds + extra, peak, n)
        print(f"note: XLA counts {unseen / 1e12:.4g} TFLOP per chip fewer than the step's matmuls (a Pallas "
              f"kernel's, for one, it cannot see); if its time leaves them out too, at peak they add "
              f"{extra * 1e3:.1f} ms: MFU {100 * slower:.1f}%")
    if tokens:
        print(f"tokens/s per chip (compiler estimate): {tokens / seconds / n:.1f}")
    return seconds


def check_fits(memory: Memory | None, target: Target) -> None:
    if memory is not None and target.chip and memory.peak > target.chip.hbm_bytes:
        over = (memory.peak - target.chip.hbm_bytes) / GIB
        raise UsageError(f"does not fit: peak {memory.peak / GIB:.2f} GiB per chip is {over:.2f} GiB over the "
                         f"{target.chip.hbm_bytes / GIB:g} GiB HBM of a {target.chip.name}; {REMEDIES}")


@dataclasses.dataclass(frozen=True)
class Setup:
    config: Any
    target: Target
    devices: list[Any]
    shape: tuple[int, ...]
    mesh: Any
    batch_size: int


def setup(args: argparse.Namespace) -> Setup:
    """The config, target, devices and mesh the flags name, each mistake one line."""
    from xemogpt_jax import config_checks, config_files

    try:
        config = config_files.load(args.config)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    for assignment in args.set:
        override(config, assignment)
    config_checks.check_model_fields(config, lambda field: f"--set {field}")
    shape = mesh_shape_of(args, config)
    target = parse_target(args.target or default_target(shape))
    if args.infer and config.stage != "sft":
        raise UsageError(f"--infer: inference runs the stage-3 model (configs/sft.py), not stage {config.stage}")
    if args.search and target.chip is None:
        raise UsageError("--search ranks layouts by the TPU compiler's step time: give --target tpu:<topology>")
    if args.audio_seconds is not None:
        if "max_audio_seconds" not in config.data:
            raise UsageError(f"--audio-seconds: stage {config.stage} takes no audio")
        config.data.max_audio_seconds = args.audio_seconds
    if "model" in config and config.model.get("attention") == "auto":
        # compiled here on a CPU host, but for the target: ``auto`` is what the target's own run picks
        from xemogpt_jax.models.attention import backend_for

        config.model.attention = backend_for(target.kind)
    devices = target_devices(target)

    from xemogpt_jax import sharding

    try:
        shape = sharding.resolve_mesh_shape(shape, len(devices))
    except ValueError as error:
        raise UsageError(f"{error} on --target {args.target or default_target(shape)}") from None
    batch_size = args.batch_size or config.data.batch_size
    batch_shards = shape[0] * shape[1]
    if batch_size % batch_shards:
        raise UsageError(f"global batch {batch_size} does not divide over data x fsdp = {batch_shards} devices; "
                         f"try --batch-size {batch_shards * max(1, batch_size // batch_shards)}")
    return Setup(config, target, devices, shape, make_mesh(target, devices, shape), batch_size)


def override(config: Any, assignment: str) -> None:
    """``--set a.b=value`` into an existing field; the value read as a Python literal where it is one, else as text."""
    field, equals, text = assignment.partition("=")
    *parents, name = field.split(".")
    node = config
    for part in parents:
        node = node.get(part) if hasattr(node, "get") else None
    if not equals or node is None or name not in node:
        raise UsageError(f"--set {assignment}: expected FIELD=VALUE with FIELD a field of the config, "
                         "e.g. model.attention=splash")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    try:
        node[name] = value
    except TypeError as error:
        raise UsageError(f"--set {assignment}: {error}") from None


def describe(s: Setup, args: argparse.Namespace) -> str:
    where = f"tpu:{s.target.topology} ({len(s.devices)} x {s.target.chip.name})" if s.target.chip else \
        f"cpu:{len(s.devices)}"
    return (f"config {args.config} (stage {s.config.stage}): target {where}, mesh (data, fsdp, tensor) = {s.shape}, "
            f"global batch {s.batch_size}, compute dtype {s.config.dtype}"
            + (f", attention {s.config.model.attention}" if "model" in s.config else ""))


def unrolled_copy(config: Any) -> Any | None:
    """The config with every layer scan unrolled (None where it has no such switch or is unrolled already)."""
    if "model" not in config or "unroll_layers" not in config.model or config.model.unroll_layers:
        return None
    unrolled = config.copy_and_resolve_references()
    unrolled.model.unroll_layers = True
    return unrolled


def run(args: argparse.Namespace) -> int:
    if args.infer and args.search:
        raise UsageError("--infer and --search: give one (the search lays out the train step)")
    if args.ops < 0:
        raise UsageError(f"--ops {args.ops}: expected how many ops to list (0 lists none)")
    if args.ops and args.search:
        raise UsageError("--ops and --search: give one (break down the winning layout with --mesh, --batch-size "
                         "and --ops)")
    s = setup(args)
    if args.infer:
        return run_infer(args, s)
    if args.search:
        return run_search(args, s)

    step = build_step(s.config, s.mesh, s.batch_size, args.seq_len)
    lengths = ", ".join(f"{name} {tuple(spec.shape)}" for name, spec in step.batch.items())
    print(describe(s, args))
    print(f"batch (from the stage's collate): {lengths}")
    print(f"parameters: {step.total_params / 1e9:.3f} B total, {step.trainable_params / 1e6:.1f} M trainable; "
          f"optimizer + trained state {step.trained_values / 1e6:.1f} M values")
    def build(config: Any) -> Step:
        return build_step(config, s.mesh, s.batch_size, args.seq_len)

    tokens = s.batch_size * step.batch["token_ids"].shape[1] if "token_ids" in step.batch else None
    memory = compile_and_report(step, build, tokens, s, args)
    check_fits(memory, s.target)
    return 0


def compile_and_report(program: Any, build: Callable[[Any], Any], tokens: int | None, s: Setup,
                       args: argparse.Namespace) -> Memory | None:
    """Compile ``program`` (what ``build(s.config)`` gives) as configured, print its memory, cost, step time and
    MFU; returns its memory."""
    start = time.perf_counter()
    compiled = compile_variant(program, None, False, s.mesh, s.target)
    print(f"lowered and compiled in {time.perf_counter() - start:.1f} s", flush=True)
    memory = memory_of(compiled)
    print_memory(memory, s.target)
    cost = costed(compiled, program, build, s.config, args.cost, s)
    print_estimate(cost, step_flops(program, build, s.config, s.mesh), s.target, len(s.devices), tokens)
    if args.ops:
        from xemogpt_jax import hlo_ops

        print("where the time goes (the TPU compiler's per-op estimate, the program as configured):")
        print("\n".join(hlo_ops.report(compiled.as_text(), args.ops)))
    return memory


def run_infer(args: argparse.Namespace, s: Setup) -> int:
    """Compile the inference programs (:mod:`xemogpt_jax.aot_infer`) and print each one's figures."""

    from xemogpt_jax import aot_infer

    def programs(config: Any) -> list[aot_infer.Program]:
        return aot_infer.build_programs(config, s.mesh, s.batch_size, args.seq_len, args.beams, args.max_new_tokens)

    print(describe(s, args).replace("global batch", "clips"))
    configured = programs(s.config)
    worst: aot_infer.Program | None = None
    worst_memory: Memory | None = None
    for index, program in enumerate(configured):
        print(f"\n{program.name}")

        def build(config: Any, index: int = index) -> aot_infer.Program:
            return programs(config)[index]

        memory = compile_and_report(program, build, program.tokens, s, args)
        if memory is not None and (worst_memory is None or memory.peak > worst_memory.peak):
            worst, worst_memory = program, memory
    if worst is not None:
        print(f"\nlargest peak: {worst.name}, {worst_memory.peak / GIB:.3f} GiB per {s.target.unit}")
    check_fits(worst_memory, s.target)
    return 0


def run_search(args: argparse.Namespace, s: Setup) -> int:
    """Rank the layouts :mod:`xemogpt_jax.aot_search` tries and say which to launch with."""
    from xemogpt_jax import aot_search

    print(describe(s, args).split(", mesh")[0] + ": searching layouts (every figure a compiler estimate)")
    results = aot_search.search(args, s)
    unit = "tokens" if any(r.items > r.layout.global_batch for r in results) else "clips"
    aot_search.print_table(results, unit, s.target.chip.hbm_bytes)
    winner = aot_search.best(results)
    if winner is None:
        raise UsageError(f"no layout tried fits the {s.target.chip.hbm_bytes / GIB:g} GiB HBM of a "
                         f"{s.target.chip.name}; {REMEDIES}")
    mfu = f"MFU {100 * winner.mfu:.1f}%" if winner.mfu is not None else "no MFU: loop bodies counted once"
    print(f"\nlaunch with ({aot_search.describe(winner.layout)}: {winner.rate_per_chip:.1f} {unit}/s per chip, "
          f"{mfu}, compiler estimates):")
    print(f"  tools/launch_tpu_pod.sh train TPU_NAME ZONE {args.config} gs://BUCKET/RUN "
          + " ".join(winner.layout.overrides()))
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
