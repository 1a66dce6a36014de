"""``xemogpt-aot --search``: which layout to launch a stage with, on the TPU compiler's estimates.

A layout is a mesh (data, fsdp, tensor splits of the topology), the remat of the LLM layers (``model.remat``)
and of the tower and bridge layers (``model.remat_towers``), and the batch per data x fsdp shard. For each
mesh and remat pair the batch grows until the step no longer fits the chip's HBM (a larger one would not fit
either); the largest batch that fits is costed (its loops unrolled, as a plain ``xemogpt-aot`` run costs a
step) and the fitting layouts are ranked by estimated tokens/s per chip (stage 3; clips/s for stages 1-2).
The winner is printed as the ``--config.*`` overrides that ``xemogpt_jax.train`` and
``tools/launch_tpu_pod.sh train`` take as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any

from xemogpt_jax.cli_checks import UsageError


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: tuple[int, int, int]
    remat: str | None  # model.remat (None: the stage has no LLM)
    remat_towers: str
    per_shard_batch: int  # rows per data x fsdp shard

    @property
    def global_batch(self) -> int:
        return self.per_shard_batch * self.mesh[0] * self.mesh[1]

    def overrides(self) -> list[str]:
        """The layout as ``--config.*`` flags (shell-quoted where the shell would read them otherwise)."""
        flags = [f"'--config.mesh.shape=({','.join(map(str, self.mesh))})'",
                 f"--config.data.batch_size={self.global_batch}"]
        if self.remat is not None:
            flags.append(f"--config.model.remat={self.remat}")
        return flags + [f"--config.model.remat_towers={self.remat_towers}"]

    def configure(self, config: Any) -> Any:
        """A copy of ``config`` with this layout's fields set."""
        out = config.copy_and_resolve_references()
        out.mesh.shape = self.mesh
        out.data.batch_size = self.global_batch
        if self.remat is not None:
            out.model.remat = self.remat
        out.model.remat_towers = self.remat_towers
        return out


@dataclasses.dataclass
class Result:
    layout: Layout
    peak: int | None  # bytes per chip (None: the compiler refused it for HBM)
    fits: bool
    seconds: float | None = None  # estimated step time
    mfu: float | None = None
    items: int = 0  # tokens (stage 3) or clips per step

    @property
    def rate_per_chip(self) -> float:
        if not self.seconds:
            return 0.0
        return self.items / self.seconds / math.prod(self.layout.mesh)


def parse_list(text: str, flag: str, kind: type = str) -> list[Any]:
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text}: expected a comma-separated list") from None


def mesh_shapes(devices: int, tensor_splits: list[int]) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) with power-of-two entries over ``devices`` chips, tensor among ``tensor_splits``."""
    shapes = []
    for tensor in tensor_splits:
        if tensor < 1 or devices % tensor:
            continue
        rest = devices // tensor
        shapes += [(rest // fsdp, fsdp, tensor) for fsdp in (2**i for i in range(rest.bit_length()))
                   if rest % fsdp == 0]
    return shapes


def parse_meshes(text: str, devices: int) -> list[tuple[int, int, int]]:
    meshes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(x) for x in part.split(","))
        except ValueError:
            raise UsageError(f"--search-meshes {text}: expected data,fsdp,tensor;... e.g. 1,16,1;2,8,1") from None
        if len(shape) != 3 or math.prod(shape) != devices:
            raise UsageError(f"--search-meshes: {part} is not 3 entries whose product is the {devices} chips")
        meshes.append(shape)
    return meshes


def candidates(args: Any, config: Any, devices: int) -> list[tuple[tuple[int, int, int], str | None, str]]:
    """The (mesh, model.remat, model.remat_towers) combinations the flags ask for."""
    meshes = (parse_meshes(args.search_meshes, devices) if args.search_meshes
              else mesh_shapes(devices, parse_list(args.search_tensor, "--search-tensor", int)))
    has_llm = "remat" in config.model
    remats = parse_list(args.search_remat, "--search-remat") if has_llm else [None]
    towers = parse_list(args.search_remat_towers, "--search-remat-towers")
    return list(itertools.product(meshes, remats, towers))


def search(args: Any, s: Any) -> list[Result]:
    """Compile each layout for ``s.target`` (an :class:`xemogpt_jax.aot_check.Setup`) and collect its figures."""
    import jax

    from xemogpt_jax import aot_check, metrics

    batches = sorted(parse_list(args.search_batch, "--search-batch", int))
    results: list[Result] = []
    for mesh_shape, remat, towers in candidates(args, s.config, len(s.devices)):
        mesh = aot_check.make_mesh(s.target, s.devices, mesh_shape)
        largest: tuple[Layout, Any, Any] | None = None
        for per_shard in batches:
            layout = Layout(mesh_shape, remat, towers, per_shard)
            config = layout.configure(s.config)
            step = aot_check.build_step(config, mesh, layout.global_batch, args.seq_len)
            start = time.perf_counter()
            try:
                with jax.set_mesh(mesh):
                    compiled = aot_check.compile_lowered(step.lower)
            except UsageError:  # the TPU compiler found it over the HBM
                results.append(Result(layout, None, False))
                print(f"  {describe(layout)}: does not fit ({time.perf_counter() - start:.0f} s)", flush=True)
                break
            memory = aot_check.memory_of(compiled)
            fits = memory is None or memory.peak <= s.target.chip.hbm_bytes
            results.append(Result(layout, memory.peak if memory else None, fits))
            print(f"  {describe(layout)}: peak {memory.peak / aot_check.GIB:.2f} GiB per chip, "
                  f"{'fits' if fits else 'does not fit'} ({time.perf_counter() - start:.0f} s)", flush=True)
            if not fits:
                break
            largest = (layout, step, compiled)
        if largest is None:
            continue
        layout, step, compiled = largest
        result = next(r for r in results if r.layout == layout)

        def build(config: Any, layout: Layout = layout) -> Any:
            return aot_check.build_step(config, mesh, layout.global_batch, args.seq_len)

        cost, _ = aot_check.loop_free_cost(compiled, step, build, layout.configure(s.config), args.cost, mesh,
                                           s.target)
        flops = aot_check.step_flops(step, build, layout.configure(s.config), mesh)
        result.seconds, _, bound = aot_check.step_seconds(cost, s.target.chip, flops.executed / len(s.devices))
        if not cost.loops and not bound:  # a time that counts loop bodies once, or a roofline, overstates MFU
            result.mfu = metrics.mfu(flops.model, result.seconds, s.target.chip.peak_bf16_flops, len(s.devices))
        tokens = step.batch.get("token_ids")
        result.items = layout.global_batch * (tokens.shape[1] if tokens is not None else 1)
    return results


def describe(layout: Layout) -> str:
    remat = "" if layout.remat is None else f"remat {layout.remat}, "
    return (f"mesh {','.join(map(str, layout.mesh))}, {remat}towers {layout.remat_towers}, "
            f"batch {layout.global_batch} ({layout.per_shard_batch} per shard)")


def ranked(results: list[Result]) -> list[Result]:
    """Fitting, costed layouts first, fastest per chip first; then the others by peak."""
    costed = sorted((r for r in results if r.fits and r.seconds), key=lambda r: -r.rate_per_chip)
    return costed + [r for r in results if r not in costed]


def print_table(results: list[Result], unit: str, hbm_bytes: int) -> None:
    gib = 2**30
    print(f"\n{'rank':>4}  {'mesh':<8} {'remat':<34} {'towers':<10} {'batch':>5} {'/shard':>6} "
          f"{'peak GiB':>8} {'HBM %':>6} {'step ms':>9} {f'{unit}/s/chip':>14} {'MFU %':>6}   (compiler estimates)")
    for rank, r in enumerate(ranked(results), 1):
        layout = r.layout
        peak = f"{r.peak / gib:8.2f}" if r.peak is not None else f"{'over':>8}"
        share = f"{100 * r.peak / hbm_bytes:6.1f}" if r.peak is not None else f"{'-':>6}"
        mfu = f"{100 * r.mfu:6.1f}" if r.mfu is not None else f"{'-':>6}"
        timing = (f"{r.seconds * 1e3:9.2f} {r.rate_per_chip:14.1f} {mfu}" if r.seconds
                  else f"{'-':>9} {'-':>14} {'-':>6}")
        fit = "" if r.fits else "  does not fit"
        print(f"{rank:>4}  {','.join(map(str, layout.mesh)):<8} {layout.remat or '-':<34} {layout.remat_towers:<10} "
              f"{layout.global_batch:>5} {layout.per_shard_batch:>6} {peak} {share} {timing}{fit}")


def best(results: list[Result]) -> Result | None:
    order = ranked(results)
    return order[0] if order and order[0].fits and order[0].seconds else None
