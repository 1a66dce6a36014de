"""Where a compiled TPU program spends its time, op by op, on the TPU compiler's own per-op estimate.

XLA's ``cost_analysis`` gives a program's totals only. The TPU compiler also writes an ``estimated_cycles``
figure into the backend config of most ops it schedules (fusions, copies; not Pallas kernels' custom calls
nor async collectives, whose count the report gives instead). This reads them from the compiled HLO text
(``compiled.as_text()``), counts a while loop's body once per iteration (the trip count read from its
condition, ``counter < N``) and sums the ops that come from one source op (the JAX ``op_name`` in their
metadata) at one result shape, so a layer's matmul inside a 36-layer scan is one row. The figures are
shares of the compiler's estimate, not measurements: its per-op cycles include each op's fixed overhead and
ignore overlap, so they do not add up to XLA's step time.
"""

from __future__ import annotations

import collections
import dataclasses
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) ")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%(\S+) = ")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_SOURCE = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|branch_computations)=\{?(%[^,}\s]+(?:, %[^,}\s]+)*)\}?")
_CONSTANT = re.compile(r"constant\((-?\d+)\)")
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
# Ops that only move or re-lay data (a layer's slice of a stacked weight, a scan's stacked output), and ops
# that are no work of their own.
_DATA_MOVEMENT = {"copy", "copy-start", "copy-done", "transpose", "slice", "dynamic-slice", "dynamic-update-slice",
                  "concatenate", "pad", "reshape", "broadcast", "iota", "gather", "scatter", "reverse"}
_PLUMBING = {"fusion", "parameter", "constant", "bitcast", "tuple", "get-tuple-element"}
# Computations that run as their callers' control flow; a fusion's ``calls`` is its body, costed as one op.
_CONTROL_FLOW = {"while": ("body", "condition"), "call": ("to_apply",), "conditional": ("branch_computations",),
                 "async-start": ("calls",)}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    operands: tuple[str, ...]
    called: dict[str, tuple[str, ...]]  # attribute -> computation names
    cycles: int | None  # the compiler's estimate (None: it gives none for this op)
    source: str  # the JAX op the instruction came from ("" where its metadata names none)
    shape: str  # of its result, per device, without layouts
    root: bool  # its computation's result
    text: str


@dataclasses.dataclass
class OpCost:
    """One source op's share at one result shape: its instructions' estimated cycles, each times how often
    it runs (a layer's q and o projections are both ``dot_general``; their shapes tell them apart)."""
    source: str
    kind: str
    shape: str
    cycles: float = 0.0
    instructions: int = 0  # in the program's text
    runs: float = 0.0  # of those instructions per run of the program


def _closing(text: str, opening: int) -> int:
    """The index of the parenthesis that closes the one at ``opening`` (the end of ``text`` if none does)."""
    depth = 0
    for index in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return len(text)


def _split_instruction(text: str) -> tuple[str, str, str, str]:
    """(shape, opcode, operand text, attribute text) of ``%name = shape opcode(operands), attributes``."""
    rest = text.split(" = ", 1)[1]
    end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")  # a tuple shape, or one array's
    shape, rest = rest[:end], rest[end:].strip()
    opening = rest.index("(")
    closing = _closing(rest, opening)
    return shape, rest[:opening], rest[opening + 1:closing], rest[closing + 1:]


def _instruction(name: str, root: bool, text: str) -> Instruction:
    shape, opcode, operands, attributes = _split_instruction(text)
    called = {key: tuple(part.strip().lstrip("%") for part in value.split(","))
              for key, value in _CALLS.findall(attributes)}
    cycles = _CYCLES.search(attributes)
    source = _SOURCE.search(attributes)
    shape = re.sub(r"\{[^}]*\}|/\*index=\d+\*/", "", shape)  # layouts and tuple-index comments
    return Instruction(name, opcode, tuple(re.findall(r"%([\w.\-]+)", operands)), called,
                       int(cycles[1]) if cycles else None, source[1] if source else "", shape, root, text)


def parse(hlo_text: str) -> tuple[str, dict[str, list[Instruction]]]:
    """The entry computation's name and every computation's instructions, in order."""
    computations: dict[str, list[Instruction]] = {}
    entry, current, lines = "", None, []

    def flush() -> None:
        if current is not None and lines:
            start = _INSTRUCTION.match(lines[0])
            computations[current].append(_instruction(start[2], bool(start[1]), "\n".join(lines)))

    for line in hlo_text.splitlines():
        if _INSTRUCTION.match(line):
            flush()
            lines = [line]
        elif line == "}":
            flush()
            current, lines = None, []
        elif current is None and (header := _COMPUTATION.match(line)):
            current, lines = header[2], []
            computations[current] = []
            entry = current if header[1] else entry
        elif lines:
            lines.append(line)  # a long attribute (a Pallas kernel's metadata) runs over several lines
    return entry, computations


def trip_count(loop: Instruction, computations: dict[str, list[Instruction]],
               scope: dict[str, Instruction]) -> int | None:
    """How often ``loop``'s body runs: ``N - start`` for a condition ``counter < N`` whose counter starts at a
    constant ``start`` in the loop's initial tuple (0 where it is not a constant); None where the condition
    is not of that form."""
    condition = {i.name: i for i in computations[loop.called["condition"][0]]}
    root = next(i for i in condition.values() if i.root)
    if root.opcode != "compare" or "direction=LT" not in root.text or len(root.operands) != 2:
        return None
    counter, bound = (condition.get(name) for name in root.operands)
    if counter is None or bound is None or bound.opcode != "constant" or counter.opcode != "get-tuple-element":
        return None
    stop = int(_CONSTANT.search(bound.text)[1])
    index = int(re.search(r"index=(\d+)", counter.text)[1])
    start = 0
    initial = scope.get(loop.operands[0]) if loop.operands else None
    if initial is not None and initial.opcode == "tuple" and index < len(initial.operands):
        first = scope.get(initial.operands[index])
        if first is not None and first.opcode == "constant":
            start = int(_CONSTANT.search(first.text)[1])
    return max(0, stop - start)


def _fused_opcodes(instruction: Instruction, computations: dict[str, list[Instruction]]) -> set[str]:
    """The opcodes of ``instruction`` and of every op fused into it, nested fusions included."""
    opcodes = {instruction.opcode}
    for name in instruction.called.get("calls", ()):
        for inner in computations.get(name, ()):
            opcodes |= _fused_opcodes(inner, computations)
    return opcodes


def kind_of(instruction: Instruction, computations: dict[str, list[Instruction]]) -> str:
    """What the op does, in the words a reader of a TPU profile uses."""
    opcodes = _fused_opcodes(instruction, computations)
    if instruction.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in instruction.text:
        return "Pallas kernel"
    if opcodes & {"convolution", "dot"}:
        return "matmul"  # a collective matmul (an all-gather fused with its matmul) too
    if any(op.startswith(_COLLECTIVES) for op in opcodes):
        return "collective"
    if opcodes - _PLUMBING <= _DATA_MOVEMENT:
        return "data movement"
    return "elementwise/reduce"


@dataclasses.dataclass
class Breakdown:
    rows: list[OpCost]  # largest first
    unestimated: dict[str, float]  # kind -> runs of ops of that kind the compiler gives no estimate for
    unknown_trips: list[str]  # loops whose trip count could not be read (their bodies counted once)


def op_costs(hlo_text: str) -> Breakdown:
    """Every source op's estimated cycles in a run of the program."""
    entry, computations = parse(hlo_text)
    rows: dict[tuple[str, str, str], OpCost] = {}
    unknown: list[str] = []
    unestimated: dict[str, float] = collections.defaultdict(float)

    def walk(name: str, runs: float) -> None:
        scope = {i.name: i for i in computations[name]}
        for instruction in computations[name]:
            if instruction.opcode == "while":
                trips = trip_count(instruction, computations, scope)
                if trips is None:
                    unknown.append(instruction.name)
                walk(instruction.called["body"][0], runs * (1 if trips is None else trips))
                walk(instruction.called["condition"][0], runs * (1 if trips is None else trips + 1))
                continue
            for attribute in _CONTROL_FLOW.get(instruction.opcode, ()):
                for called in instruction.called.get(attribute, ()):
                    walk(called, runs)
            kind = kind_of(instruction, computations)
            if instruction.cycles is None:
                if kind in ("Pallas kernel", "collective"):
                    unestimated[kind] += runs
                continue
            key = (instruction.source, kind, instruction.shape)
            row = rows.setdefault(key, OpCost(*key))
            row.cycles += instruction.cycles * runs
            row.instructions += 1
            row.runs += runs

    walk(entry, 1.0)
    return Breakdown(sorted(rows.values(), key=lambda row: row.cycles, reverse=True), dict(unestimated), unknown)


def short_source(source: str) -> str:
    """The op's JAX name without the tracing wrappers that every op of a step shares."""
    text = re.sub(r"^jit\([^)]*\)/", "", source)
    text = text.replace("transpose(jvp())", "backward").replace("jvp()", "forward")
    text = re.sub(r"(while/body/|closed_call/|shard_map/|vmap\(vmap\(static_sparsity_splash\)\)/)", "", text)
    return text or "(unnamed)"


def report(hlo_text: str, top: int) -> list[str]:
    """Lines of text: the estimate's split by kind of op, then the ``top`` source ops."""
    breakdown = op_costs(hlo_text)
    rows = breakdown.rows
    if not rows:
        return ["no per-op estimate in this program (the TPU compiler writes one: --target tpu:<topology>)"]
    total = sum(row.cycles for row in rows)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for row in rows:
        by_kind[row.kind] += row.cycles
    lines = ["by kind of op (share of the compiler's per-op estimate, every loop iteration counted):"]
    lines += [f"  {cycles / total:6.1%}  {kind}" for kind, cycles in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines.append(f"largest {min(top, len(rows))} of {len(rows)} source ops by result shape (x: instructions run per "
                 "step; shapes per device):")
    lines += [f"  {row.cycles / total:6.1%}  {row.kind:<18} x{row.runs:<6g} {short_source(row.source)} {row.shape}"
              for row in rows[:top]]
    for kind, runs in sorted(breakdown.unestimated.items()):
        lines.append(f"not in the shares: {runs:g} {kind} call(s) per step, which the compiler gives no estimate for")
    if breakdown.unknown_trips:
        lines.append(f"note: {len(breakdown.unknown_trips)} loop(s) with a trip count not read from their condition, "
                     f"their bodies counted once: {', '.join(breakdown.unknown_trips[:5])}")
    return lines
