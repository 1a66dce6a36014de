"""The one loader: models are built abstractly, placed by their logical axes, and filled tensor by tensor.

Training (each stage's ``init_from``), inference (``explainer.load``: infer, serve, cue extraction),
``import_weights`` and ``export_pytorch`` all build their models here, so no host or chip ever
holds a whole model, and every command reads the same checkpoints. An XEmoGPT is filled from, in
override order:

1. ``init_from.model``: an imported model checkpoint (its adapters folded into the base kernels);
2. ``init_from.clip`` / ``hubert`` / ``llm``: HF folders, streamed through the family key maps;
3. ``init_from.video_bridge`` / ``audio_bridge``: the stage 1-2 workdirs' bridges, and the towers
   those stages trained (``model.train_encoders``);
4. the checkpoint being loaded: the ``model`` subtree of its ``state`` item (optimizer state is
   never read).

Whatever no source sets is initialised in its sharding from the run's seed, with the values the
trainer's own initialisation gives (``build_model(nnx.Rngs(seed))``), and the log names those parts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh

from xemogpt_jax import checkpoint, run_config, sharding
from xemogpt_jax.models import clip_params, hf_io, hubert_params, qwen3_params
from xemogpt_jax.models import lora as lora_lib
from xemogpt_jax.models.xemogpt import XEmoGPT, XEmoGPTConfig
from xemogpt_jax.models.xemogpt_params import ModelSpec

M = TypeVar("M", bound=nnx.Module)
TreePath = tuple[str, ...]
STAGE3 = "sft"
# init_from HF folder -> (XEmoGPT attribute, key map)
HF_PARTS: dict[str, tuple[str, hf_io.KeyMap]] = {
    "clip": ("vision_tower", clip_params.vision_key_map),
    "hubert": ("audio_tower", hubert_params.hubert_key_map()),
    "llm": ("llm", qwen3_params.hf_key_map),
}
# init_from stage 1-2 workdir -> (stored subtree -> XEmoGPT subtree)
BRIDGE_RUNS: dict[str, dict[TreePath, TreePath]] = {
    "video_bridge": {("model", "vecb"): ("vecb",), ("model", "clip", "vision_model"): ("vision_tower",)},
    "audio_bridge": {("model", "aecb"): ("aecb",), ("model", "hubert"): ("audio_tower",)},
}
OWN_MODEL: dict[TreePath, TreePath] = {("model",): ()}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint any command takes: the folder Orbax owns, its resolved run config, and its step."""

    directory: Path
    run: dict[str, Any]
    step: int | None
    spec: ModelSpec | None  # set for an imported model checkpoint

    @property
    def seed(self) -> int:
        return int(self.run.get("seed", 0))


def open_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """A stage-3 run (workdir or ``checkpoints/``) or an imported model checkpoint; stage 1-2 runs are refused."""
    directory = checkpoint.checkpoint_directory(path)
    stored = checkpoint.restore_config(directory, step)
    if ModelSpec.describes(stored):
        return Checkpoint(directory, run_config.resolve(stored), step, ModelSpec.from_json(stored))
    stage = stored.get("stage")
    if stage != STAGE3:
        raise ValueError(
            f"{path} is a stage-1/2 run (stage {stage!r}); infer, serve and export need a stage-3 ({STAGE3!r}) "
            "run or an imported model checkpoint (import_weights)"
        )
    return Checkpoint(directory, run_config.resolve(stored), step, None)


def model_spec(found: Checkpoint) -> ModelSpec:
    """The spec an export writes: the imported checkpoint's own, or the one a stage-3 run's config implies."""
    return found.spec if found.spec is not None else run_config.model_spec(found.run)


# ---------------------------------------------------------------- filling


def _flat(module: nnx.Module) -> dict[TreePath, nnx.Variable]:
    return {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(module))}


def _is_unset(variable: nnx.Variable) -> bool:
    return isinstance(variable.get_value(), jax.ShapeDtypeStruct)


def fill_from_hf(module: nnx.Module, folder: str | Path, key_map: hf_io.KeyMap, mesh: Mesh) -> hf_io.LoadReport:
    """Stream a HF folder into ``module``; every parameter but LoRA adapters must receive a tensor."""
    report = hf_io.assign(module, hf_io.iter_tensors(folder), key_map, mesh)
    missing = [m for m in report.missing if m.split("[")[0].rsplit("/", 1)[-1] not in ("lora_a", "lora_b")]
    if missing:
        raise ValueError(f"{folder}: no checkpoint tensor for {missing[:8]} ({len(missing)} in all)")
    return report


def place_module(target: nnx.Module, source: nnx.Module, mesh: Mesh) -> None:
    """Every variable of a small host-built ``source`` (a sentence-transformers pipeline) into ``target``'s
    shardings."""
    state = nnx.state(source)
    nnx.update(target, jax.device_put(state, sharding.state_shardings(nnx.state(target), mesh)))


def _nested(tree: Any, path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def fill_from_state(
    module: nnx.Module, directory: str | Path, moves: Mapping[TreePath, TreePath], mesh: Mesh, step: int | None = None
) -> list[TreePath]:
    """Copy subtrees of a checkpoint's ``state`` item into ``module``, each array read straight into its sharding.

    ``moves`` maps a stored subtree to a subtree of ``module``; absent stored subtrees are skipped (a
    stage 1-2 run keeps its tower only when it trained it), but at least one must be there. Returns
    the module paths filled.
    """
    variables = _flat(module)
    stored = checkpoint.state_metadata(directory, step)
    target: dict[str, Any] = {}
    placed: list[tuple[TreePath, TreePath]] = []
    for source, destination in moves.items():
        subtree = _nested(stored, source)
        if subtree is None:
            continue
        for path, meta in jax.tree_util.tree_flatten_with_path(subtree)[0]:
            relative = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            own = destination + relative
            variable = variables.get(own)
            if variable is None or tuple(meta.shape) != tuple(variable.get_value().shape):
                want = "absent" if variable is None else tuple(variable.get_value().shape)
                raise ValueError(
                    f"{directory}: stored {'/'.join(source + relative)} {tuple(meta.shape)} does not fit the model's "
                    f"{'/'.join(own)} ({want})"
                )
            full = source + relative
            node = target
            for key in full[:-1]:
                node = node.setdefault(key, {})
            value = variable.get_value()
            node[full[-1]] = jax.ShapeDtypeStruct(
                value.shape, value.dtype, sharding=sharding.variable_sharding(variable, mesh)
            )
            placed.append((full, own))
    if not placed:
        raise ValueError(f"{directory}: the checkpoint's state holds none of {['/'.join(s) for s in moves]}")
    restored = checkpoint.restore_state_part(directory, target, step)
    for stored_path, own in placed:
        variables[own].set_value(_nested(restored, stored_path))
    return [own for _, own in placed]


def init_unset(module: M, factory: Callable[[], M], mesh: Mesh) -> list[TreePath]:
    """Give every variable no source set its initial value, created directly in its sharding.

    Only the unset variables are outputs of the jitted init, so the rest of the init is never
    computed; values equal those ``factory()`` gives.
    Returns the paths initialised.
    """
    unset = [(path, v) for path, v in _flat(module).items() if _is_unset(v)]
    if not unset:
        return []

    def init() -> list[jax.Array]:
        fresh = _flat(factory())
        return [fresh[path].get_value() for path, _ in unset]

    shardings = [sharding.variable_sharding(v, mesh) for _, v in unset]
    with jax.set_mesh(mesh):
        values = jax.jit(init, out_shardings=shardings)()
    for (_, variable), value in zip(unset, values):
        variable.set_value(value)
    return [path for path, _ in unset]


def log_seeded(paths: Iterable[TreePath], what: str, seed: int) -> None:
    """Name the parts (first two path levels) that were initialised from the seed."""
    parts = sorted({"/".join(p[:2]) for p in paths})
    if parts:
        logging.info("%s: initialised from seed %d (no source sets them): %s", what, seed, ", ".join(parts))


def fill_init_from(model: XEmoGPT, init_from: Mapping[str, Any], mesh: Mesh) -> None:
    """Stage 3's pretrained parts from ``init_from``: model checkpoint, HF folders, then the stage 1-2 workdirs."""
    if init_from.get("model"):
        copy_model_checkpoint(model, init_from["model"], mesh)
    for key, (attribute, key_map) in HF_PARTS.items():
        if init_from.get(key):
            fill_from_hf(getattr(model, attribute), init_from[key], key_map, mesh)
    for key, moves in BRIDGE_RUNS.items():
        if init_from.get(key):
            fill_from_state(model, Path(init_from[key]) / "checkpoints", moves, mesh)


def from_hf(factory: Callable[[], M], folder: str | Path, key_map: hf_io.KeyMap,
            mesh: Mesh | None = None) -> tuple[M, hf_io.LoadReport]:
    """One HF model on its own (a Qwen3, a CLIP, a HuBERT), built abstractly and streamed in tensor by tensor.

    ``factory`` is the family's (``qwen3_params.hf_factory``, ...); LoRA adapters, which no HF folder
    holds, get the factory's initial values. Without ``mesh`` the model lives on the first device.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = nnx.eval_shape(factory)
    with jax.set_mesh(mesh):
        report = fill_from_hf(model, folder, key_map, mesh)
    init_unset(model, factory, mesh)
    return model, report


# ---------------------------------------------------------------- XEmoGPT


def xemogpt_factory(config: XEmoGPTConfig, seed: int) -> Callable[[], XEmoGPT]:
    """The stage-3 task's model, with the trainer's rngs (so unset parameters get the trainer's values)."""
    return lambda: XEmoGPT(config, rngs=nnx.Rngs(seed))


def load_model_checkpoint(directory: str | Path, mesh: Mesh, step: int | None = None) -> tuple[XEmoGPT, ModelSpec]:
    """The model of an imported model checkpoint, every parameter read straight into its sharding."""
    found = open_checkpoint(directory, step)
    if found.spec is None:
        raise ValueError(f"{directory} is a trainer run, not an imported model checkpoint")
    factory = xemogpt_factory(run_config.xemogpt_config(found.run), found.seed)
    model = nnx.eval_shape(factory)
    fill_from_state(model, found.directory, OWN_MODEL, mesh, step)
    init_unset(model, factory, mesh)
    return model, found.spec


def copy_model_checkpoint(target: XEmoGPT, directory: str | Path, mesh: Mesh) -> None:
    """Every weight of a model checkpoint into ``target``, except ``target``'s own LoRA adapters.

    Adapters the checkpoint carries are folded into their base kernels first (sharded), so the
    imported model's function is kept whatever LoRA (or none) the run trains on top.
    """
    source, _ = load_model_checkpoint(directory, mesh)
    lora_lib.merge_lora(source)
    values = _flat(nnx.state(source, nnx.Param))
    wanted = _flat(nnx.state(target, nnx.All(nnx.Param, nnx.Not(lora_lib.LoraParam))))
    if values.keys() != wanted.keys():
        raise ValueError(f"model checkpoint {directory} holds other parameters than the run's model")
    mismatched = [
        f"{'/'.join(path)}: checkpoint {values[path].get_value().shape}, model {variable.get_value().shape}"
        for path, variable in wanted.items()
        if values[path].get_value().shape != variable.get_value().shape
    ]
    if mismatched:
        raise ValueError(f"model checkpoint {directory} does not fit the run's model: {mismatched[:8]}")
    for path, variable in wanted.items():
        variable.set_value(values[path].get_value())


def load_xemogpt(found: Checkpoint, config: XEmoGPTConfig, mesh: Mesh) -> XEmoGPT:
    """The model of a stage-3 run or model checkpoint, sharded on ``mesh``: ``init_from``, then its own state."""
    factory = xemogpt_factory(config, found.seed)
    model = nnx.eval_shape(factory)
    with jax.set_mesh(mesh):
        if found.spec is None:
            fill_init_from(model, found.run.get("init_from", {}), mesh)
        fill_from_state(model, found.directory, OWN_MODEL, mesh, found.step)
    log_seeded(init_unset(model, factory, mesh), str(found.directory), found.seed)
    return model
