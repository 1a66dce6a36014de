"""Tiny HF models on disk and a release-style PyTorch XEmoGPT (spec section 7 names, real PEFT wrapping).

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

FRAMES, IMAGE, ALIGN, TEXT_DIM, RANK, ALPHA = 4, 28, 16, 16, 4, 8.0
TINY_CONFIG = f'''
import ml_collections


def get_config(variant=""):
    c = ml_collections.ConfigDict()
    rank = 0 if variant == "frozen" else {RANK}
    c.model = ml_collections.ConfigDict(dict(
        bridge_layers=2, num_frames={FRAMES}, align_dim={ALIGN}, text_dim={TEXT_DIM},
        lora=dict(rank=rank, alpha={ALPHA}, dropout=0.0, targets=("q_proj", "k_proj", "v_proj")),
    ))
    return c
'''


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LoRA B too, so adapters matter): matrices ~ N(0, 1/fan_in), vectors small noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


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

    def __init__(self, llm: transformers.PreTrainedModel, clip: transformers.CLIPModel, hubert: transformers.HubertModel):
        super().__init__()
        lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
        self.llm_model = peft.get_peft_model(llm, lora)
        self.visual_encoder = VisualEncoder(clip)
        self.audio_encoder = AudioEncoder(hubert)
        llm_width = llm.config.hidden_size
        self.visual_llm_project = torch.nn.Linear(clip.config.vision_config.hidden_size, llm_width)
        self.audio_llm_project = torch.nn.Linear(hubert.config.hidden_size, llm_width)


def build_world(root: Path) -> dict[str, Path | ReleaseXEmoGPT]:
    """HF dirs for the three backbones, a tiny config file, and a release state dict (``release.ckpt``)."""
    llm = save_tiny_hf("qwen3", root / "llm")
    torch.manual_seed(1)
    clip, hubert = tiny_clip(), tiny_hubert()
    randomize(clip, 2)
    randomize(hubert, 3)
    clip.save_pretrained(root / "clip")
    hubert.save_pretrained(root / "hubert")
    (root / "tiny_config.py").write_text(TINY_CONFIG)
    release = ReleaseXEmoGPT(llm, clip, hubert).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # bridges, heads, projections and adapters get trained-looking values; backbones stay
        for name, p in release.named_parameters():
            if not name.startswith(("visual_encoder.clip.", "audio_encoder.audio_encoder.")) and (
                "lora_" in name or not name.startswith("llm_model.")
            ):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    torch.save(release.state_dict(), root / "release.ckpt")
    return dict(llm=root / "llm", clip=root / "clip", hubert=root / "hubert", config=root / "tiny_config.py",
                release=root / "release.ckpt", module=release)


def import_args(world: dict, out: Path, *extra: str, variant: str = "") -> list[str]:
    config = f"{world['config']}:{variant}" if variant else str(world["config"])
    return ["--llm", str(world["llm"]), "--clip", str(world["clip"]), "--hubert", str(world["hubert"]),
            "--config", config, "--out", str(out), *extra]


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
