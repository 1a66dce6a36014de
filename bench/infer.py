"""Inference throughput: ours (JAX) vs transformers ``generate`` over the same weights, and EmoCue-360 scoring.

1. decode: the LLM alone (a small random Qwen3), prompts given as input embeddings, greedy and
   5-beam; decode tokens/s = new tokens after the first / (time(N tokens) - time(1 token)), so
   the prefill is not counted. Every figure is the best of ``--repeats`` runs, ours and theirs
   timed in turn (``bench.timing``), so their ratio survives a machine whose speed drifts.
2. explanations/s: the whole model on the shared clip (audio + video + subtitle) -> text, ours
   (``Explainer.explain``) vs a PyTorch composition of transformers modules (CLIPVisionModel,
   HubertModel, CLIP/HuBERT encoder layers as bridges, Linear projections, Qwen3ForCausalLM)
   holding the same weights, both greedy from the same preprocessed inputs and prompt layout.
3. EmoCue-360 scoring: cues/s of ``emocue360.score`` with our JAX MiniLM vs sentence-transformers.

    python -m bench.infer [--new-tokens 64] [--batch 1 8] [--repeats 5] [--clips 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from bench.timing import best_seconds
from xemogpt_jax import emocue360, loading, prompt
from xemogpt_jax.explainer import Clip, Decoding, Explainer, read_clip
from xemogpt_jax.generate import GenerationConfig, generate, prepare_for_decoding
from xemogpt_jax.models import presets, qwen3_params
from xemogpt_jax.models.clip import CLIPVisionConfig
from xemogpt_jax.models.hubert import HubertConfig
from xemogpt_jax.models.qwen3 import Qwen3Config
from xemogpt_jax.models.xemogpt import XEmoGPT, XEmoGPTConfig
from xemogpt_jax.preprocessing import audio as audio_pre
from xemogpt_jax.preprocessing import image as image_pre
from xemogpt_jax.testing.byte_tokenizer import byte_tokenizer
from xemogpt_jax.testing.torch_reference import TorchXEmoGPT, load_into, randomize

MEDIA = Path(__file__).resolve().parents[2] / "shared/media"
AUDIO_SAMPLES = 32_000  # 2 s: 200 audio tokens with the tiny HuBERT (100 frames/s)
BUCKETS = (256, 512, 768, 1024)


def small_qwen(vocab_size: int) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        attn_implementation="sdpa",
    )


# ---- 1. decode -----------------------------------------------------------------------------------

def bench_decode(new_tokens: int, batches: list[int], repeats: int, prompt_length: int = 128) -> None:
    hf = transformers.Qwen3ForCausalLM(small_qwen(4096)).eval()
    randomize(hf, 0)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours, _ = loading.from_hf(qwen3_params.hf_factory(folder), folder, qwen3_params.hf_key_map)
    prepare_for_decoding(ours, jax.default_backend())  # as explainer.load does
    print(f"decode: Qwen3 hidden 512 x 8 layers, vocab 4096, prompt {prompt_length} embeddings, "
          f"{new_tokens} new tokens")
    print(f"{'mode':<14}{'batch':>6}{'ours tok/s':>13}{'HF tok/s':>11}{'ratio':>8}")
    for beams in (1, 5):
        for batch in batches:
            rng = np.random.default_rng(batch)
            embeds = rng.normal(0, 0.02, (batch, prompt_length, 512)).astype(np.float32)
            mask = np.ones((batch, prompt_length), np.int32)

            def ours_run(n: int) -> None:
                config = GenerationConfig(max_new_tokens=n, pad_token_id=0, num_beams=beams)
                generate(ours, inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(mask),
                         config=config).tokens.block_until_ready()

            def hf_run(n: int) -> None:
                with torch.no_grad():
                    hf.generate(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                                max_new_tokens=n, min_new_tokens=n, num_beams=beams, do_sample=False,
                                pad_token_id=0, eos_token_id=None)

            ours_full, hf_full, ours_first, hf_first = best_seconds(
                [lambda: ours_run(new_tokens), lambda: hf_run(new_tokens), lambda: ours_run(1), lambda: hf_run(1)],
                repeats)
            rates = [batch * (new_tokens - 1) / max(full - first, 1e-9)
                     for full, first in ((ours_full, ours_first), (hf_full, hf_first))]
            mode = "greedy" if beams == 1 else f"beam {beams}"
            print(f"{mode:<14}{batch:>6}{rates[0]:>13.1f}{rates[1]:>11.1f}{rates[0] / rates[1]:>7.2f}x")


# ---- 2. explanations ------------------------------------------------------------------------------

def torch_explain(reference: TorchXEmoGPT, layout: dict[str, np.ndarray], frames: torch.Tensor, audio: torch.Tensor,
                  audio_mask: torch.Tensor, tokenizer, new_tokens: int) -> np.ndarray:
    """Greedy token ids from the PyTorch composition, prompts laid out as ours (left-padded)."""
    audio_tokens, _ = reference.audio_tokens(audio, audio_mask)
    embeds = reference.input_embeddings(
        torch.from_numpy(layout["token_ids"]).long(), torch.from_numpy(layout["kind"]).long(),
        torch.from_numpy(layout["feature_index"]).long(), reference.video_tokens(frames), audio_tokens,
    )
    out = reference.llm.generate(
        inputs_embeds=embeds, attention_mask=torch.from_numpy(layout["attention_mask"]), max_new_tokens=new_tokens,
        do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return out.numpy()


def bench_explanations(new_tokens: int, clips: int, repeats: int) -> None:
    tokenizer = byte_tokenizer()
    clip = presets.get("clip", "tiny")
    vision, hubert = clip["vision_config"], presets.get("hubert", "tiny")
    clip_hf = transformers.CLIPVisionConfig(**vision, attn_implementation="sdpa")
    hubert_hf = transformers.HubertConfig(**hubert, attn_implementation="eager")
    qwen_hf = small_qwen(len(tokenizer))
    qwen_hf.pad_token_id, qwen_hf.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    reference = TorchXEmoGPT(clip_hf, hubert_hf, qwen_hf, num_frames=16).eval()
    randomize(reference, 1)
    config = XEmoGPTConfig(
        vision=CLIPVisionConfig.from_hf(clip_hf.to_dict()), hubert=HubertConfig.from_hf(hubert_hf.to_dict()),
        llm=Qwen3Config.from_hf(qwen_hf.to_dict()), video_text_dim=clip["projection_dim"],
        audio_text_dim=presets.get("text_encoder", "tiny")["hidden_size"], num_frames=16,
        max_audio_samples=AUDIO_SAMPLES, max_context=2048,
    )
    model = XEmoGPT(config, rngs=nnx.Rngs(0))
    load_into(model, reference)
    prepare_for_decoding(model.llm, jax.default_backend())  # as explainer.load does
    explainer = Explainer(model, tokenizer, buckets=BUCKETS)
    clip = read_clip("bench", MEDIA / "sample_00000007.mp4", None, "I can't believe you did that.",
                     frame_size=config.vision.image_size)
    clip = Clip("bench", clip.frames, clip.audio[:AUDIO_SAMPLES], clip.subtitle)
    batch_clips = [clip] * clips
    decoding = Decoding(max_new_tokens=new_tokens, num_beams=1, do_sample=False)

    samples = [explainer.layout(c) for c in batch_clips]
    layout = prompt.collate_for_generation(samples, BUCKETS, tokenizer.pad_token_id)
    frames = torch.from_numpy(np.stack([image_pre.normalize(c.frames) for c in batch_clips]))
    values, mask = audio_pre.preprocess_audio([c.audio for c in batch_clips], max_samples=AUDIO_SAMPLES)
    audio, audio_mask = torch.from_numpy(values), torch.from_numpy(mask).long()

    def torch_run() -> list:
        with torch.no_grad():
            return torch_explain(reference, layout, frames, audio, audio_mask, tokenizer, new_tokens)

    ours_text = explainer.explain(batch_clips, decoding)
    torch_tokens = torch_run()
    same = ours_text[0] == explainer.decode(torch_tokens[0], (tokenizer.eos_token_id,))
    ours_s, torch_s = best_seconds([lambda: explainer.explain(batch_clips, decoding), torch_run], repeats)
    print(f"explanations: whole model on the shared clip (16 frames 64px, 2 s audio), {clips} clips per batch, "
          f"greedy {new_tokens} tokens; same text as transformers: {same}")
    print(f"  ours {clips / ours_s:.2f} explanations/s   transformers {clips / torch_s:.2f} explanations/s   "
          f"ratio {torch_s / ours_s:.2f}x")


# ---- 3. EmoCue-360 scoring ------------------------------------------------------------------------

def synthetic_cues(samples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    subjects = ["He", "She", "The speaker", "The woman", "The man"]
    verbs = ["frowns", "smiles", "raises his voice", "speaks softly", "looks away", "sighs", "laughs", "pauses"]
    tails = ["slightly", "repeatedly", "at the end", "while talking", "with tension", "calmly"]
    sentence = lambda: f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(tails)}."  # noqa: E731
    return {f"s{i}": {axis: [sentence() for _ in range(rng.integers(2, 6))] for axis in emocue360.AXES}
            for i in range(samples)}


def bench_scoring(samples: int, repeats: int) -> None:
    from sentence_transformers import SentenceTransformer

    folder = emocue360.default_embedder_dir()
    pred, gt = synthetic_cues(samples, 0), synthetic_cues(samples, 1)
    cues = sum(len(v) for f in (pred, gt) for entry in f.values() for v in entry.values())
    ours = emocue360.jax_embedder(folder)
    reference = SentenceTransformer(str(folder), device="cpu")
    ref_embed = lambda texts: reference.encode(texts, convert_to_numpy=True, batch_size=128)  # noqa: E731
    seconds = best_seconds([lambda: emocue360.score(pred, gt, ours), lambda: emocue360.score(pred, gt, ref_embed)],
                           repeats)
    rates = [cues / s for s in seconds]
    print(f"EmoCue-360 scoring, {samples} samples, {cues} cues (MiniLM-L6): ours {rates[0]:.0f} cues/s, "
          f"sentence-transformers {rates[1]:.0f} cues/s, ratio {rates[0] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--clips", type=int, default=8, help="clips per batch for explanations/s")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=200, help="samples for the scoring benchmark")
    parser.add_argument("--only", choices=("decode", "explain", "score"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    if args.only in (None, "decode"):
        bench_decode(args.new_tokens, args.batch, args.repeats)
    if args.only in (None, "explain"):
        bench_explanations(args.new_tokens, args.clips, args.repeats)
    if args.only in (None, "score"):
        bench_scoring(args.samples, args.repeats)


if __name__ == "__main__":
    main()
