"""The one loader of ml_collections config files, ``FILE[:variant]``, for every command that takes ``--config``.

``FILE`` is a path (``configs/sft.py``) or, when no such file exists, the name of one of the packaged stage
configs (``sft.py``, ``align_video.py``, ``align_audio.py``), so installed commands work from any folder.
``python -m xemogpt_jax.train`` reads the same files through absl's ``config_flags``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

import configs

PACKAGED = Path(configs.__file__).resolve().parent


def packaged(name: str) -> str:
    """The path of a packaged stage config (``sft.py`` -> ``.../configs/sft.py``)."""
    return str(PACKAGED / name)


def resolve_path(file: str) -> Path:
    """``file`` as given when it exists, else the packaged config of that name; names both on failure."""
    path = Path(file)
    if path.is_file():
        return path
    if (PACKAGED / path.name).is_file() and path.parent in (Path("."), Path("configs")):
        return PACKAGED / path.name
    known = ", ".join(sorted(p.name for p in PACKAGED.glob("*.py") if not p.name.startswith("_")))
    raise FileNotFoundError(f"--config {file}: no such file (packaged configs: {known})")


def located(spec: str) -> str:
    """``FILE[:variant]`` with ``FILE`` made a path that exists (a packaged config's), or unchanged when none does."""
    file, colon, variant = spec.partition(":")
    try:
        return f"{resolve_path(file)}{colon}{variant}"
    except FileNotFoundError:
        return spec


def load(spec: str) -> ml_collections.ConfigDict:
    """``FILE[:variant]`` -> the ConfigDict of that file's ``get_config(variant)``."""
    file, _, variant = spec.partition(":")
    path = resolve_path(file)
    module_spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"--config {file}: not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {file}: defines no get_config(variant)")
    return module.get_config(variant)
