"""Tiny HF models on disk and a release-style PyTorch XEmoGPT (docs/architecture.md section 7 names, real PEFT
wrapping).

Shared by the importer and exporter tests. The release tree is built from transformers and peft
modules, so its state dict carries the key names the authors' checkpoint has, including PEFT's
``base_layer`` and ``lora_A.default`` spellings.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.hubert.modeling_hubert import HubertEncoderLayer

from tests.qwen_fixtures import save_tiny_hf
from xemogpt_jax import import_weights
from xemogpt_jax.testing.torch_reference import randomize

FRAMES, IMAGE, ALIGN, TEXT_DIM, RANK, ALPHA = 4, 28, 16, 16, 4, 8.0
TINY_CONFIG = f'''
import ml_collections


def get_config(variant=""):
    c = ml_collections.ConfigDict()
    rank = 0 if variant == "frozen" else {RANK}
    c.model = ml_collections.ConfigDict(dict(
        bridge_layers=2, num_frames={FRAMES}, align_dim={ALIGN},
        text_encoder=dict(model_type="bert", vocab_size=64, hidden_size={TEXT_DIM}, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32),
        lora=dict(rank=rank, alpha={ALPHA}, dropout=0.0, targets=("q_proj", "k_proj", "v_proj")),
    ))
    return c
'''


def tiny_clip() -> transformers.CLIPModel:
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=40, max_position_embeddings=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=16,
    )
    return transformers.CLIPModel(config).eval()


def tiny_hubert() -> transformers.HubertModel:
    config = transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=True,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )
    return transformers.HubertModel(config).eval()


class VisualEncoder(torch.nn.Module):
    def __init__(self, clip: transformers.CLIPModel):
        super().__init__()
        vision = clip.config.vision_config
        width = vision.hidden_size
        self.clip = clip
        self.visual_alignment_layer = torch.nn.ModuleList(CLIPEncoderLayer(vision) for _ in range(2))
        self.position_embedding = torch.nn.Parameter(torch.zeros(1, FRAMES, width))
        self.attention_pooling = torch.nn.Module()
        self.attention_pooling.attn_vector = torch.nn.Parameter(torch.zeros(width))
        self.visual_project = torch.nn.Linear(width, ALIGN)
        self.text_project = torch.nn.Linear(TEXT_DIM, ALIGN)
        self.temporal_disc_head = torch.nn.Sequential(
            torch.nn.Linear(ALIGN, ALIGN), torch.nn.ReLU(), torch.nn.Linear(ALIGN, 1)
        )
        self.frame_reconstructor = torch.nn.Linear(width, width)


class AudioEncoder(torch.nn.Module):
    def __init__(self, hubert: transformers.HubertModel):
        super().__init__()
        self.audio_encoder = hubert
        self.audio_alignment_layer = torch.nn.ModuleList(HubertEncoderLayer(hubert.config) for _ in range(2))
        self.audio_project = torch.nn.Linear(hubert.config.hidden_size, ALIGN)
        self.text_project = torch.nn.Linear(TEXT_DIM, ALIGN)


class ReleaseXEmoGPT(torch.nn.Module):
    """The release's module tree at tiny size; ``state_dict()`` gives release-style keys."""

    def __init__(
        self, llm: transformers.PreTrainedModel, clip: transformers.CLIPModel, hubert: transformers.HubertModel
    ):
        super().__init__()
        targets = ["q_proj", "k_proj", "v_proj"]
        lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
        self.llm_model = peft.get_peft_model(llm, lora)
        self.visual_encoder = VisualEncoder(clip)
        self.audio_encoder = AudioEncoder(hubert)
        llm_width = llm.config.hidden_size
        self.visual_llm_project = torch.nn.Linear(clip.config.vision_config.hidden_size, llm_width)
        self.audio_llm_project = torch.nn.Linear(hubert.config.hidden_size, llm_width)


def _trainable(name: str) -> bool:
    """Bridges, heads, projections and adapters: the parts a release trains."""
    if name.startswith(("visual_encoder.clip.", "audio_encoder.audio_encoder.")):
        return False
    return "lora_" in name or not name.startswith("llm_model.")


def build_world(root: Path) -> dict[str, Path]:
    """HF dirs for the three backbones, a tiny config file, and a release state dict (``release.ckpt``).

    Built once per test session under ``root`` (the marker file says it is complete).
    """
    paths = dict(llm=root / "llm", clip=root / "clip", hubert=root / "hubert", config=root / "tiny_config.py",
                 release=root / "release.ckpt")
    if (root / "complete").is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    save_tiny_hf("qwen3", paths["llm"])
    torch.manual_seed(1)
    clip, hubert = tiny_clip(), tiny_hubert()
    randomize(clip, 2)
    randomize(hubert, 3)
    clip.save_pretrained(paths["clip"])
    hubert.save_pretrained(paths["hubert"])
    paths["config"].write_text(TINY_CONFIG)
    release = load_release_module(paths, state=None)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # trained-looking values where a release trains; backbones stay as saved
        for name, p in release.named_parameters():
            if _trainable(name):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    torch.save(release.state_dict(), paths["release"])
    (root / "complete").touch()
    return paths


def load_release_module(world: dict[str, Path], state: str | None = "release") -> ReleaseXEmoGPT:
    """The PyTorch release tree over the saved backbones, with ``world[state]`` loaded (``None``: fresh)."""
    load = dict(attn_implementation="eager")
    llm = transformers.AutoModelForCausalLM.from_pretrained(world["llm"], **load).eval()
    clip = transformers.CLIPModel.from_pretrained(world["clip"], **load).eval()
    hubert = transformers.HubertModel.from_pretrained(world["hubert"], **load).eval()
    module = ReleaseXEmoGPT(llm, clip, hubert).eval()
    if state is not None:
        module.load_state_dict(torch.load(world[state], weights_only=True), strict=True)
    return module


def release_state(world: dict[str, Path]) -> dict[str, np.ndarray]:
    """The trainable tensors of the release file, as numpy (what an xemogpt export must reproduce)."""
    state = torch.load(world["release"], weights_only=True)
    return {k: v.numpy() for k, v in state.items() if _trainable(k)}


def import_args(world: dict, out: Path, *extra: str, variant: str = "") -> list[str]:
    config = f"{world['config']}:{variant}" if variant else str(world["config"])
    return ["--llm", str(world["llm"]), "--clip", str(world["clip"]), "--hubert", str(world["hubert"]),
            "--config", config, "--out", str(out), *extra]


def imported(world: dict[str, Path], root: Path, *extra: str, variant: str = "") -> Path:
    """A checkpoint imported from ``world`` (plus ``extra`` flags), made once per session under ``root``."""
    out = root / "checkpoint"
    if not (root / "complete").is_file():
        import_weights.main(import_args(world, out, *extra, variant=variant))
        (root / "complete").touch()
    return out


def release_import(world: dict[str, Path], base: Path) -> Path:
    """The session's checkpoint imported from the HF dirs plus the release file."""
    return imported(world, base / "weights_release_import", "--release-ckpt", str(world["release"]))


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IMAGE, IMAGE, 3)).astype(np.float32)


def waveforms(lengths: tuple[int, ...] = (400, 330), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = np.zeros((len(lengths), max(lengths)), np.float32)
    mask = np.zeros(values.shape, np.int32)
    for i, n in enumerate(lengths):
        values[i, :n] = rng.standard_normal(n)
        mask[i, :n] = 1
    return values, mask

