"""PyTorch reference compositions used by the tests and the benchmarks; imports torch, so never imported by
the library itself.

:class:`TorchXEmoGPT` is XEmoGPT composed from transformers modules the way the release builds it:
CLIPVisionModel and HubertModel towers, CLIPEncoderLayer / HubertEncoderLayer bridges, Linear
projections and Qwen3ForCausalLM. :func:`load_into` copies its weights into our
:class:`~xemogpt_jax.models.xemogpt.XEmoGPT`, so a parity test or a benchmark runs both on the same
weights. Nothing here reuses our layout or model code: the PyTorch side is transformers' own maths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.hubert.modeling_hubert import HubertEncoderLayer

from xemogpt_jax import prompt
from xemogpt_jax.models import clip_params, hf_io, hubert_params, qwen3_params

TensorsByPath = list[tuple[tuple, np.ndarray]]


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LoRA B too, so adapters matter): matrices ~ N(0, 1/fan_in), vectors small noise.

    transformers' own init leaves biases at zero and norms at one, which would hide key-mapping mistakes.
    """
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


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def torch_state(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """``(prefix + name, array)`` for every tensor of a module's state dict."""
    return [(prefix + k, v.detach().numpy()) for k, v in module.state_dict().items()]


def _our_path(path: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split(".") if p)


def linear_and_norm_tensors(module: torch.nn.Module, path: str = "") -> TensorsByPath:
    """(our path, array) for every nn.Linear / nn.LayerNorm inside ``module``: kernels transposed, weight -> scale.

    An ``nn.Sequential`` child index ``i`` becomes ``layers/i`` (how ``nnx.Sequential`` stores it).
    """
    out = []
    for name, child in module.named_modules():
        parent = module
        ours = []
        for part in name.split(".") if name else []:
            if isinstance(parent, torch.nn.Sequential):
                ours.append("layers")
            ours.append(part)
            parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
        prefix = _our_path(path) + _our_path(".".join(ours))
        if isinstance(child, torch.nn.Linear):
            out.append((prefix + ("kernel",), child.weight.detach().numpy().T))
            if child.bias is not None:
                out.append((prefix + ("bias",), child.bias.detach().numpy()))
        elif isinstance(child, torch.nn.LayerNorm):
            out.append((prefix + ("scale",), child.weight.detach().numpy()))
            out.append((prefix + ("bias",), child.bias.detach().numpy()))
    return out


def assign_paths(model: nnx.Module, tensors: TensorsByPath, mesh: Mesh | None = None) -> hf_io.LoadReport:
    """``hf_io.assign`` with tensors already keyed by our paths."""
    named = [("/".join(map(str, p)), a) for p, a in tensors]
    lookup = {"/".join(map(str, p)): p for p, _ in tensors}
    return hf_io.assign(model, named, lambda name: hf_io.Target(lookup[name]), mesh)


class TorchXEmoGPT(torch.nn.Module):
    """The release's module composition; the bridges are encoder layers of the towers' configs.

    ``forward`` takes our laid-out batch (:mod:`xemogpt_jax.prompt`) and gives the causal-LM loss
    on pre-shifted labels, like ``XEmoGPT.__call__``; tests that must not share our layout build
    their own sequences from :meth:`video_tokens` and :meth:`audio_tokens`.
    """

    def __init__(
        self,
        clip_config: transformers.CLIPVisionConfig,
        hubert_config: transformers.HubertConfig,
        qwen_config: transformers.Qwen3Config,
        num_frames: int,
        bridge_layers: int = 2,
    ):
        super().__init__()
        self.clip = transformers.CLIPVisionModel(clip_config)
        self.hubert = transformers.HubertModel(hubert_config)
        self.position_embedding = torch.nn.Parameter(torch.zeros(1, num_frames, clip_config.hidden_size))
        self.visual_alignment_layer = torch.nn.ModuleList(CLIPEncoderLayer(clip_config) for _ in range(bridge_layers))
        self.audio_alignment_layer = torch.nn.ModuleList(
            HubertEncoderLayer(hubert_config) for _ in range(bridge_layers)
        )
        self.visual_llm_project = torch.nn.Linear(clip_config.hidden_size, qwen_config.hidden_size)
        self.audio_llm_project = torch.nn.Linear(hubert_config.hidden_size, qwen_config.hidden_size)
        self.llm = transformers.Qwen3ForCausalLM(qwen_config)

    def freeze_towers(self) -> TorchXEmoGPT:
        """Stage 3's frozen CLIP and HuBERT: no gradients, so autograd records nothing through them."""
        self.clip.requires_grad_(False)
        self.hubert.requires_grad_(False)
        return self

    def video_tokens(self, frames_nhwc: torch.Tensor) -> torch.Tensor:
        """Normalised frames ``[B, F, H, W, 3]`` -> ``[B, F, D_llm]``: per-frame CLS, VECB, projection."""
        b, f = frames_nhwc.shape[:2]
        pixels = frames_nhwc.reshape(b * f, *frames_nhwc.shape[2:]).permute(0, 3, 1, 2)
        x = self.clip(pixel_values=pixels).last_hidden_state[:, 0].reshape(b, f, -1) + self.position_embedding
        for layer in self.visual_alignment_layer:
            x = layer(x, None)
        return self.visual_llm_project(x)

    def audio_tokens(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform ``[B, S]`` + sample mask -> (``[B, T, D_llm]`` tokens, HuBERT's own frame mask ``[B, T]``)."""
        hidden = self.hubert(audio, attention_mask=audio_mask).last_hidden_state
        frame_mask = self.hubert._get_feature_vector_attention_mask(hidden.shape[1], audio_mask)
        valid = frame_mask[..., None].to(hidden.dtype)
        x = hidden * valid
        bias = (1.0 - valid[:, None, None, :, 0]) * torch.finfo(x.dtype).min
        for layer in self.audio_alignment_layer:
            x = layer(x, attention_mask=bias)
        return self.audio_llm_project(x * valid), frame_mask

    def input_embeddings(
        self, token_ids: torch.Tensor, kind: torch.Tensor, feature_index: torch.Tensor,
        video: torch.Tensor, audio: torch.Tensor,
    ) -> torch.Tensor:
        """Token embeddings with every audio/video slot of our layout holding its feature token."""
        embeds = self.llm.get_input_embeddings()(token_ids)
        for slot, tokens in ((prompt.AUDIO, audio), (prompt.VIDEO, video)):
            index = feature_index.clamp(0, tokens.shape[1] - 1)[..., None].expand(-1, -1, tokens.shape[-1])
            embeds = torch.where((kind == slot)[..., None], torch.gather(tokens, 1, index), embeds)
        return embeds

    def forward(
        self, token_ids: torch.Tensor, kind: torch.Tensor, feature_index: torch.Tensor, labels: torch.Tensor,
        attention_mask: torch.Tensor, positions: torch.Tensor, frames: torch.Tensor, audio: torch.Tensor,
        audio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy over the target tokens (``labels`` pre-shifted, -100 elsewhere)."""
        audio_tokens, _ = self.audio_tokens(audio, audio_mask)
        embeds = self.input_embeddings(token_ids, kind, feature_index, self.video_tokens(frames), audio_tokens)
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions).logits
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=prompt.IGNORE_INDEX
        )


def load_into(model: nnx.Module, reference: TorchXEmoGPT, mesh: Mesh | None = None) -> list[str]:
    """Copy every weight of ``reference`` into our ``XEmoGPT``; returns the tower and LLM parameters left unfilled.

    LoRA adapters (the reference has none) are the only ones a correct copy leaves unfilled there.
    """
    missing = []
    for part, tensors, key_map in (
        (model.vision_tower, torch_state(reference.clip), clip_params.vision_key_map),
        (model.audio_tower, torch_state(reference.hubert), hubert_params.hubert_key_map()),
        (model.llm, torch_state(reference.llm), qwen3_params.hf_key_map),
    ):
        missing += hf_io.assign(part, tensors, key_map, mesh).missing
    tensors = [(("vecb", "position_embedding"), reference.position_embedding.detach().numpy()[0])]
    for name, prefix in (("visual_alignment_layer", "vecb."), ("audio_alignment_layer", "aecb."),
                         ("visual_llm_project", ""), ("audio_llm_project", "")):
        tensors += linear_and_norm_tensors(getattr(reference, name), prefix + name)
    assign_paths(model, tensors, mesh)
    return missing
