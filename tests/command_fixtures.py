"""Tiny HF model folders, file hashes and stored checkpoint state for the tests that run the commands as a user does."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
import transformers

from xemogpt_jax import checkpoint
from xemogpt_jax.models import presets


def tiny_hf_folders(out: Path, tokenizer: Path) -> dict[str, Path]:
    """Random transformers models with the tiny configs' architectures (seeded: every run trains the same
    models); the LLM folder carries the tokenizer."""
    torch.manual_seed(0)
    llm = {k: v for k, v in presets.get("llm", "tiny").items() if k != "model_type"}
    clip, hubert = presets.get("clip", "tiny"), presets.get("hubert", "tiny")
    models = {
        "llm": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**llm)),
        "clip": transformers.CLIPModel(transformers.CLIPConfig(**clip)),
        "hubert": transformers.HubertModel(transformers.HubertConfig(**hubert)),
    }
    folders = {}
    for name, model in models.items():
        folders[name] = out / name
        model.save_pretrained(folders[name])
    shutil.copytree(tokenizer, folders["llm"], dirs_exist_ok=True)
    return folders


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path: equal trees, byte for byte, give equal dicts."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def stored_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``state`` item as Orbax stores it, as host numpy arrays: the reference for what was saved."""
    on_host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_host),
                          checkpoint.state_metadata(directory))
    return jax.tree.map(np.asarray, checkpoint.restore_state_part(directory, target))
