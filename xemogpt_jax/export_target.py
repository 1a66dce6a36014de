"""Where an export may write, and writing it so that ``--out`` never holds a partial or clobbered model.

An export reads the checkpoint and the folders its stored config names (``init_from.*``, a model spec's
``sources``: the frozen weights and the tokenizer); writing into any of them, or into a folder that
contains one, could overwrite the very files it reads. ``--out`` must be new or empty unless
``--overwrite`` replaces an earlier export. Files go to a hidden sibling folder that is renamed to
``--out`` only once complete, so an export that dies midway leaves ``--out`` as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from xemogpt_jax.cli_checks import Problems


def read_from(checkpoint: str | Path, stored: dict[str, Any]) -> list[Path]:
    """The checkpoint folder and every folder its stored config (run config or model spec) reads from."""
    from xemogpt_jax.models.xemogpt_params import ModelSpec

    named = stored.get("sources", {}) if ModelSpec.describes(stored) else stored.get("init_from", {})
    return [Path(checkpoint), *(Path(path) for path in named.values() if path)]


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_out(problems: Problems, flag: str, out: str | Path, overwrite: bool, sources: Iterable[Path]) -> None:
    """``out`` must be new or empty (or ``overwrite``), and neither inside nor around a folder the export reads."""
    target = Path(out).resolve()
    for source in sources:
        if _overlaps(target, source.resolve()):
            problems.add(flag, f"{out} overlaps {source}, which the model's weights or tokenizer are read from; "
                               "choose a new folder")
    if target.exists() and not target.is_dir():
        problems.add(flag, f"{out} is a file, not a folder")
    elif target.is_dir() and any(target.iterdir()) and not overwrite:
        problems.add(flag, f"{out} is not empty; choose a new folder, or pass --overwrite to replace an earlier export")


@contextlib.contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """A fresh hidden sibling of ``out`` to write into; on success it replaces ``out``, on failure it goes away.

    A folder left by an export that was killed is removed first (the names are fixed per ``out``).
    """
    out = Path(out).absolute()
    stage, previous = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.replaced")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        os.replace(out, previous)
    os.replace(stage, out)
    shutil.rmtree(previous, ignore_errors=True)
