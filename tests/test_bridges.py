"""VECB and AECB against stacks of transformers' CLIPEncoderLayer / HubertEncoderLayer with the same weights."""

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import HubertConfig as HFHubertConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer as TorchCLIPLayer
from transformers.models.hubert.modeling_hubert import HubertEncoderLayer as TorchHubertLayer

from tests.xemogpt_fixtures import build_filled
from xemogpt_jax.models import bridges
from xemogpt_jax.models.clip import CLIPEncoderConfig
from xemogpt_jax.models.hubert import HubertConfig
from xemogpt_jax.testing.torch_reference import assign_paths, linear_and_norm_tensors, to_torch

WIDTH, FRAMES, ALIGN, TEXT = 32, 6, 24, 20
CLIP_HF = dict(
    hidden_size=WIDTH, intermediate_size=64, num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5
)
HUBERT_HF = dict(hidden_size=WIDTH, intermediate_size=48, num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-5)


class TorchVECB(torch.nn.Module):
    """The release's VECB wrapper, written plainly: P after the (optional) shuffle and mask, then CLIP layers."""

    def __init__(self):
        super().__init__()
        config = HFCLIPVisionConfig(**CLIP_HF, attn_implementation="eager")
        self.position_embedding = torch.nn.Parameter(torch.randn(1, FRAMES, WIDTH) * 0.02)
        self.visual_alignment_layer = torch.nn.ModuleList(TorchCLIPLayer(config) for _ in range(2))
        self.attn_vector = torch.nn.Parameter(torch.randn(WIDTH))
        self.visual_project = torch.nn.Linear(WIDTH, ALIGN)
        self.text_project = torch.nn.Linear(TEXT, ALIGN)
        self.temporal_disc_head = torch.nn.Sequential(
            torch.nn.Linear(ALIGN, ALIGN), torch.nn.ReLU(), torch.nn.Linear(ALIGN, 1)
        )
        self.frame_reconstructor = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, frames, order, masked):
        frames = frames[torch.arange(frames.shape[0])[:, None], order]
        frames = frames.masked_fill(masked[..., None], 0.0)
        x = frames + self.position_embedding
        for layer in self.visual_alignment_layer:
            x = layer(x, None)
        weights = torch.softmax(x @ self.attn_vector, dim=1)
        video = self.visual_project((weights[..., None] * x).sum(1))
        return x, video, self.temporal_disc_head(video)[:, 0], self.frame_reconstructor(x)


def test_vecb_matches_clip_layer_stack():
    torch.manual_seed(0)
    reference = TorchVECB().eval()
    config = bridges.VECBConfig(
        encoder=CLIPEncoderConfig.from_hf(CLIP_HF), num_layers=2, num_frames=FRAMES, align_dim=ALIGN, text_dim=TEXT
    )
    vecb = build_filled(lambda: bridges.VECB(config, rngs=nnx.Rngs(0)))
    tensors = linear_and_norm_tensors(reference)
    tensors += [(("position_embedding",), reference.position_embedding.detach().numpy()[0])]
    tensors += [(("attention_pooling", "attn_vector"), reference.attn_vector.detach().numpy())]
    report = assign_paths(vecb, tensors)
    assert not report.missing and not report.unused

    rng = np.random.default_rng(0)
    frames = rng.normal(size=(3, FRAMES, WIDTH)).astype(np.float32)
    order = np.stack([rng.permutation(FRAMES) for _ in range(3)]).astype(np.int32)
    masked = rng.random((3, FRAMES)) < 0.5
    text = rng.normal(size=(3, TEXT)).astype(np.float32)

    with torch.no_grad():
        want = [t.numpy() for t in reference(to_torch(frames), to_torch(order).long(), to_torch(masked))]
        want_text = reference.text_project(to_torch(text)).numpy()
    @nnx.jit
    def run(vecb, frames, order, masked, text):
        hidden = vecb(frames, frame_order=order, masked_frames=masked)
        video = vecb.video_embedding(hidden)
        heads = [hidden, video, vecb.temporal_logit(video), vecb.reconstruct(hidden)]
        return heads, vecb.text_embedding(text), vecb(frames)

    got, got_text, got_plain = run(vecb, frames, order, masked, text)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_text), want_text, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        identity = torch.arange(FRAMES).repeat(3, 1)
        plain = reference(to_torch(frames), identity, torch.zeros(3, FRAMES, dtype=torch.bool))[0].numpy()
    np.testing.assert_allclose(np.asarray(got_plain), plain, atol=1e-5, rtol=1e-5)
    assert not np.allclose(plain, want[0], atol=1e-3)


class TorchAECB(torch.nn.Module):
    """The release's AECB wrapper: HubertEncoderLayers with a 4D additive mask, padded frames zeroed."""

    def __init__(self):
        super().__init__()
        config = HFHubertConfig(**HUBERT_HF, attn_implementation="eager")
        self.audio_alignment_layer = torch.nn.ModuleList(TorchHubertLayer(config) for _ in range(2))
        self.audio_project = torch.nn.Linear(WIDTH, ALIGN)
        self.text_project = torch.nn.Linear(TEXT, ALIGN)

    def forward(self, hidden, mask):
        keep = mask[..., None].to(hidden.dtype)
        bias = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        x = hidden * keep
        for layer in self.audio_alignment_layer:
            x = layer(x, attention_mask=bias)
        x = x * keep
        pooled = x.sum(1) / keep.sum(1)
        return x, self.audio_project(pooled)


def test_aecb_matches_hubert_layer_stack():
    torch.manual_seed(1)
    reference = TorchAECB().eval()
    config = bridges.AECBConfig(encoder=HubertConfig.from_hf(HUBERT_HF), num_layers=2, align_dim=ALIGN, text_dim=TEXT)
    aecb = build_filled(lambda: bridges.AECB(config, rngs=nnx.Rngs(0)))
    report = assign_paths(aecb, linear_and_norm_tensors(reference))
    assert not report.missing and not report.unused

    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 11, WIDTH)).astype(np.float32)
    mask = np.arange(11)[None, :] < np.array([[11], [7], [2]])
    with torch.no_grad():
        want_hidden, want_audio = (t.numpy() for t in reference(to_torch(hidden), to_torch(mask)))
    @nnx.jit
    def run(aecb, hidden, mask):
        out = aecb(hidden, mask)
        return out, aecb.audio_embedding(out, mask)

    got, got_audio = run(aecb, hidden, mask)
    np.testing.assert_allclose(np.asarray(got), want_hidden, atol=1e-5, rtol=1e-5)
    assert not np.asarray(got)[~mask].any()
    np.testing.assert_allclose(np.asarray(got_audio), want_audio, atol=1e-5, rtol=1e-5)

    garbage = np.where(mask[..., None], hidden, 1e3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(run(aecb, garbage, mask)[0]), want_hidden, atol=1e-5, rtol=1e-5)


def test_attention_pooling_and_masked_mean_by_hand():
    pooling = build_filled(lambda: bridges.AttentionPooling(2, rngs=nnx.Rngs(0)))
    pooling.attn_vector[...] = np.array([1.0, 0.0], np.float32)
    x = np.array([[[0.0, 1.0], [np.log(3.0), 5.0]]], np.float32)
    expected = [[0.25 * 0 + 0.75 * np.log(3.0), 0.25 * 1 + 0.75 * 5]]  # weights softmax(0, log 3) = (1/4, 3/4)
    np.testing.assert_allclose(np.asarray(pooling(x)), expected, rtol=1e-6)
    mean = bridges.masked_mean(np.array([[[2.0], [4.0], [100.0]]], np.float32), np.array([[True, True, False]]))
    np.testing.assert_allclose(np.asarray(mean), [[3.0]])


def test_vecb_rejects_wrong_frame_count():
    config = bridges.VECBConfig(encoder=CLIPEncoderConfig.from_hf(CLIP_HF), num_frames=FRAMES, text_dim=TEXT)
    with pytest.raises(ValueError, match="frames"):
        build_filled(lambda: bridges.VECB(config, rngs=nnx.Rngs(0)))(np.zeros((1, FRAMES + 1, WIDTH), np.float32))
