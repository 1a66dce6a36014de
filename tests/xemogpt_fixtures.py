"""Copying PyTorch module weights into our NNX modules for the bridge and XEmoGPT parity tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from xemogpt_jax.models import hf_io

M = TypeVar("M", bound=nnx.Module)


def _ours(path: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split(".") if p)


def linear_and_norm_tensors(module: torch.nn.Module, path: str = "") -> list[tuple[tuple, np.ndarray]]:
    """(our path, array) for every nn.Linear / nn.LayerNorm inside ``module``: kernels transposed, weight -> scale.

    An ``nn.Sequential`` child index ``i`` becomes ``layers/i`` (how ``nnx.Sequential`` stores it).
    """
    out = []
    for name, child in module.named_modules():
        parts = name.split(".") if name else []
        parent = module
        ours = []
        for part in parts:
            if isinstance(parent, torch.nn.Sequential):
                ours.append("layers")
            ours.append(part)
            parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
        prefix = _ours(path) + _ours(".".join(ours))
        if isinstance(child, torch.nn.Linear):
            out.append((prefix + ("kernel",), child.weight.detach().numpy().T))
            if child.bias is not None:
                out.append((prefix + ("bias",), child.bias.detach().numpy()))
        elif isinstance(child, torch.nn.LayerNorm):
            out.append((prefix + ("scale",), child.weight.detach().numpy()))
            out.append((prefix + ("bias",), child.bias.detach().numpy()))
    return out


def build_filled(factory: Callable[[], M], seed: int = 0) -> M:
    """Build a model abstractly and fill every variable with host random values (N(0, 0.02)).

    Eager initialisation compiles one small XLA program per parameter shape, which dominates a
    tiny test's time; the parity tests overwrite the values anyway.
    """
    model = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        variable.set_value(jnp.asarray(rng.normal(0.0, 0.02, shape).astype(dtype)))
    return model


def assign_paths(model: nnx.Module, tensors: list[tuple[tuple, np.ndarray]]) -> hf_io.LoadReport:
    """``hf_io.assign`` with tensors already keyed by our paths."""
    named = [("/".join(map(str, p)), a) for p, a in tensors]
    lookup = {"/".join(map(str, p)): p for p, _ in tensors}
    return hf_io.assign(model, named, lambda name: hf_io.Target(lookup[name]))


def torch_state(module: torch.nn.Module, prefix: str) -> list[tuple[str, np.ndarray]]:
    """``(prefix + name, array)`` for every tensor of a HF module's state dict."""
    return [(prefix + k, v.detach().numpy()) for k, v in module.state_dict().items()]


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 2..257), ``<pad>`` = 0, ``<eos>`` = 1: expected ids are computable by hand."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1} | {ch: i + 2 for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
