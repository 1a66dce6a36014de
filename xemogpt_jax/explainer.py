"""Load a checkpoint once, then explain clips or answer text prompts: the core of infer, serve and cue extraction.

A clip (16 CLIP-cropped frames and/or 16 kHz mono audio, plus a subtitle) is laid out with
:mod:`xemogpt_jax.prompt` under the release's inference instruction, left-padded with its batch,
turned into LLM input embeddings by the assembled model (encoders, bridges, projections spliced
into the text stream) and decoded by :func:`xemogpt_jax.generate.generate`. Shapes are rounded up
(batch to a power of two, audio to whole seconds, prompts to the config's length buckets) so a
stream of clips compiles only a handful of programs.

``--checkpoint`` is a stage-3 trainer workdir (or its ``checkpoints/`` folder) or a model checkpoint
of ``tools/import_weights.py``: the stored config describes the architecture
(:func:`xemogpt_jax.run_config.xemogpt_config`) and :mod:`xemogpt_jax.loading` fills the model
sharded: the ``state`` item's ``model`` subtree, the frozen parts from the run's ``init_from``, and
what no source holds (random-init runs such as the demo) from the run's seed, as the trainer did.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from data_pipelines import media, schema
from xemogpt_jax import loading, losses, prompt, run_config, sharding
from xemogpt_jax.generate import GenerationConfig, OnStep, Step, generate, prepare_for_decoding
from xemogpt_jax.models import lora as lora_lib
from xemogpt_jax.models import qwen3_params
from xemogpt_jax.models.xemogpt import XEmoGPT, XEmoGPTConfig
from xemogpt_jax.preprocessing import audio as audio_pre
from xemogpt_jax.preprocessing import image as image_pre

Messages = Sequence[dict[str, str]]
# (row, token id, its log-prob, the step's top (id, log-prob) pairs): each answer token as it is decoded, before EOS
OnToken = Callable[[int, int, float, list[tuple[int, float]]], None]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """Decoding options; the defaults are the release's (docs/architecture.md, section 3)."""

    max_new_tokens: int = 756
    num_beams: int = 5
    do_sample: bool = True
    temperature: float = 0.3
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 42

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be positive")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        if self.do_sample and not self.temperature > 0:
            raise ValueError("sampling needs temperature > 0 (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class Clip:
    """One input: frames uint8 ``[F, S, S, 3]`` (already CLIP-cropped), mono 16 kHz float audio, subtitle, and
    the question asked about it (``None``: the explainer's instruction)."""

    clip_id: str
    frames: np.ndarray | None = None
    audio: np.ndarray | None = None
    subtitle: str = ""
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.frames is None and self.audio is None:
            raise ValueError(f"clip {self.clip_id!r} has neither video nor audio")


def read_clip(
    clip_id: str, video: str | Path | None = None, audio: str | Path | None = None, subtitle: str = "",
    *, frame_size: int = 224, num_frames: int = schema.NUM_FRAMES, instruction: str | None = None,
) -> Clip:
    """Decode a clip's media; without ``audio``, the video's own audio track is used when it has one.

    Raises :class:`data_pipelines.media.MediaError` for a missing, empty or corrupt file.
    """
    frames = None
    if video is not None:
        frames = media.decode_video(video, frame_size=frame_size, num_frames=num_frames).frames
    waveform = None
    if audio is not None:
        waveform = media.decode_audio(audio)
    elif video is not None:
        try:
            waveform = media.decode_audio(video)
        except media.MediaError as error:
            if error.problem != "no audio stream":
                raise
    if waveform is not None:
        waveform = waveform.astype(np.float32) / 32768.0
    return Clip(clip_id, frames, waveform, subtitle, instruction)


@dataclasses.dataclass(frozen=True)
class Generation:
    """A generated answer with what the API and ``infer --json`` report about it.

    ``token_ids`` are the generated tokens before the first EOS (the text is their decoding under
    the release's rule), ``token_logprobs`` their log-probabilities under the raw logits and
    ``top_logprobs`` the step's most likely ``(id, logprob)`` pairs when asked for;
    ``generated_tokens`` also counts the EOS when one was produced.
    """

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    prompt_tokens: int
    generated_tokens: int


@dataclasses.dataclass(frozen=True)
class Score:
    """Teacher-forced log-likelihood of one given answer: its tokens then EOS, each token's log-prob."""

    token_ids: list[int]
    token_logprobs: list[float]

    @property
    def logprob(self) -> float:
        return float(np.sum(np.asarray(self.token_logprobs, np.float64)))


def clip_from_record(record: dict[str, Any]) -> Clip:
    """A built ArrayRecord clip (see :mod:`data_pipelines.schema`) as an input."""
    frames = record["frames"] if record["has_video"] else None
    audio = schema.audio_float32(record) if record["has_audio"] else None
    return Clip(record["clip_id"], frames, audio, record["subtitle"])


def _tokenizer_folder(directory: Path, run: dict[str, Any], override: str | Path | None) -> Path:
    init = run.get("init_from", {})
    for candidate in (override, directory / "tokenizer", directory.parent / "tokenizer",
                      init.get("tokenizer"), init.get("llm")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        f"no tokenizer for {directory}: pass --tokenizer, or set init_from.tokenizer / init_from.llm in the run config"
    )


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Explainer:
    """A loaded model + tokenizer; ``explain`` clips and ``chat`` text, in batches."""

    def __init__(self, model: XEmoGPT, tokenizer: Any, *, buckets: Sequence[int] = prompt.DEFAULT_BUCKETS,
                 instruction: str = prompt.INFERENCE_INSTRUCTION):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token (BOS of every prompt) and an EOS token")
        self.model = model
        self.config: XEmoGPTConfig = model.config
        self.tokenizer = tokenizer
        self.buckets = tuple(sorted(buckets))
        self.instruction = instruction
        graphdef, self._state = nnx.split(model)

        @jax.jit
        def embed(state, token_ids, kind, feature_index, frames, audio, audio_mask):
            return nnx.merge(graphdef, state).input_embeddings(
                token_ids, kind, feature_index, frames=frames, audio=audio, audio_mask=audio_mask
            )

        self._embed = embed

    @property
    def frame_size(self) -> int:
        return self.config.vision.image_size

    def generation_config(self, decoding: Decoding) -> GenerationConfig:
        eos = {int(self.tokenizer.eos_token_id)}
        llm_eos = self.config.llm.eos_token_id
        eos |= set(llm_eos if isinstance(llm_eos, list) else [] if llm_eos is None else [llm_eos])
        return GenerationConfig(
            max_new_tokens=decoding.max_new_tokens, eos_token_id=tuple(sorted(eos)),
            pad_token_id=int(self.tokenizer.pad_token_id), do_sample=decoding.do_sample,
            temperature=decoding.temperature, top_p=decoding.top_p, num_beams=decoding.num_beams,
            repetition_penalty=decoding.repetition_penalty,
        )

    def decode(self, tokens: np.ndarray, eos: Sequence[int]) -> str:
        """The release's decoding: a leading id 0 dropped, cut at EOS, special tokens skipped."""
        ids = [int(t) for t in tokens]
        if ids and ids[0] == 0:
            ids = ids[1:]
        for i, token in enumerate(ids):
            if token in eos:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _generate(self, embeds: jax.Array, attention_mask: np.ndarray, prompt_tokens: Sequence[int],
                  decoding: Decoding, top_logprobs: int, on_token: OnToken | None = None) -> list[Generation]:
        config = dataclasses.replace(self.generation_config(decoding), top_logprobs=top_logprobs)
        on_step = None if on_token is None else _answer_tokens(on_token, len(prompt_tokens), config.eos_token_id)
        out = jax.device_get(generate(
            self.model.llm, inputs_embeds=embeds, attention_mask=jnp.asarray(attention_mask), config=config,
            rng=jax.random.key(decoding.seed), on_step=on_step,
        ))
        results = []
        for row, prompt_length in enumerate(prompt_tokens):
            tokens = [int(t) for t in out.tokens[row]]
            ends = [i for i, t in enumerate(tokens) if t in config.eos_token_id]
            length = ends[0] if ends else len(tokens)
            top = [list(zip(map(int, ids), map(float, values)))
                   for ids, values in zip(out.top_ids[row, :length], out.top_logprobs[row, :length])]
            results.append(Generation(
                text=self.decode(out.tokens[row], config.eos_token_id), token_ids=tokens[:length],
                token_logprobs=[float(v) for v in out.logprobs[row, :length]], top_logprobs=top,
                prompt_tokens=prompt_length, generated_tokens=length + 1 if ends else length,
            ))
        return results

    def layout(self, clip: Clip, target: str | None = None) -> prompt.Sample:
        num_audio = None if clip.audio is None else self.config.num_audio_tokens(len(clip.audio))
        return prompt.build_sample(
            self.tokenizer, subtitle=clip.subtitle, num_audio_tokens=num_audio, target=target,
            instruction=self.instruction if clip.instruction is None else clip.instruction,
            has_video=clip.frames is not None, num_video_tokens=self.config.num_frames,
            max_context=self.config.max_context, truncate=self.config.truncate,
        )

    def _media_arrays(self, clips: Sequence[Clip], rows: int):
        """Normalised frames ``[rows, F, S, S, 3]`` and padded audio + mask, or None where no clip has that modality."""
        frames = None
        if any(c.frames is not None for c in clips):
            size, count = self.frame_size, self.config.num_frames
            frames = np.zeros((rows, count, size, size, 3), np.float32)
            for i, clip in enumerate(clips):
                if clip.frames is None:
                    continue
                if clip.frames.shape != (count, size, size, 3):
                    raise ValueError(
                        f"clip {clip.clip_id!r}: frames {clip.frames.shape}, the model wants {(count, size, size, 3)}"
                    )
                frames[i] = image_pre.normalize(clip.frames)
        audio = audio_mask = None
        if any(c.audio is not None for c in clips):
            limit = self.config.max_audio_samples
            waves = [c.audio[:limit] if c.audio is not None else np.zeros(1, np.float32) for c in clips]
            values, mask = audio_pre.preprocess_audio(waves, max_samples=limit)
            second = audio_pre.SAMPLING_RATE
            width = min(limit, -(-values.shape[1] // second) * second)
            audio = np.zeros((rows, max(width, values.shape[1])), np.float32)
            audio_mask = np.zeros(audio.shape, np.int32)
            audio[: len(clips), : values.shape[1]] = values
            audio_mask[: len(clips), : values.shape[1]] = mask
        return frames, audio, audio_mask

    def explain(self, clips: Sequence[Clip], decoding: Decoding = Decoding()) -> list[str]:
        """One explanation per clip, computed as one padded batch."""
        return [g.text for g in self.explain_generations(clips, decoding)]

    def explain_generations(self, clips: Sequence[Clip], decoding: Decoding = Decoding(),
                            top_logprobs: int = 0, on_token: OnToken | None = None) -> list[Generation]:
        """:meth:`explain` with token ids, log-probs (and ``top_logprobs`` alternatives per step) and counts;
        ``on_token`` (one beam only) gets each clip's answer tokens as they are decoded."""
        if not clips:
            return []
        rows = _power_of_two(len(clips))
        samples = [self.layout(c) for c in clips]
        lengths = [len(s) for s in samples]
        samples += [samples[0]] * (rows - len(samples))
        batch = prompt.collate_for_generation(samples, self._buckets_for(samples), int(self.tokenizer.pad_token_id))
        frames, audio, audio_mask = self._media_arrays(clips, rows)
        embeds = self._embed(
            self._state, jnp.asarray(batch["token_ids"]), jnp.asarray(batch["kind"]),
            jnp.asarray(batch["feature_index"]), frames, audio, audio_mask,
        )
        return self._generate(embeds, batch["attention_mask"], lengths, decoding, top_logprobs, on_token)

    def score(self, clips: Sequence[Clip], answers: Sequence[str]) -> list[Score]:
        """Teacher-forced log-likelihood of ``answers[i]`` (then EOS) after clip ``i``'s prompt; one forward pass.

        The answer is laid out as a training target (:func:`prompt.build_sample` with ``target``), so a
        score is exactly the negative of the training loss summed over that sample's target tokens.
        """
        if len(clips) != len(answers):
            raise ValueError(f"{len(clips)} clips but {len(answers)} answers")
        if not clips:
            return []
        rows = _power_of_two(len(clips))
        samples = [self.layout(c, target=a) for c, a in zip(clips, answers)]
        samples += [samples[0]] * (rows - len(samples))
        batch = prompt.collate(samples, self._buckets_for(samples), int(self.tokenizer.pad_token_id))
        frames, audio, audio_mask = self._media_arrays(clips, rows)
        arrays = {k: jnp.asarray(batch[k]) for k in ("token_ids", "kind", "feature_index", "labels",
                                                      "attention_mask", "positions")}
        values = np.asarray(self._label_logprobs(self._state, arrays, frames, audio, audio_mask))
        scores = []
        for row in range(len(clips)):
            targets = batch["labels"][row] != prompt.IGNORE_INDEX
            scores.append(Score([int(t) for t in batch["labels"][row][targets]],
                                [float(v) for v in values[row][targets]]))
        return scores

    @functools.cached_property
    def _label_logprobs(self):
        """Jitted ``(state, batch, media) -> [B, L]`` log-prob of each position's label (0 where there is none)."""
        graphdef = nnx.graphdef(self.model)

        @jax.jit
        def label_logprobs(state, batch, frames, audio, audio_mask):
            model = nnx.merge(graphdef, state)
            embeds = model.input_embeddings(batch["token_ids"], batch["kind"], batch["feature_index"], frames=frames,
                                            audio=audio, audio_mask=audio_mask)
            hidden, _ = model.llm.hidden_states(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                                positions=batch["positions"])
            return losses.target_logprobs(hidden, model.llm.output_kernel(), batch["labels"], model.config.loss_chunk)

        return label_logprobs

    def chat_prompt(self, messages: Messages) -> str:
        """Messages in the template's ``###Human: ... ###Assistant: `` framing (system text first)."""
        parts = []
        for message in messages:
            content = message.get("content", "")
            if message.get("role") == "assistant":
                parts.append(f"###Assistant: {content}")
            else:
                parts.append(f"###Human: {content}" if not parts or parts[-1].startswith("###A") else content)
        return " ".join(parts) + " ###Assistant: "

    def chat(self, conversations: Sequence[Messages], decoding: Decoding) -> list[str]:
        """One reply per conversation (text only), as one left-padded batch."""
        return [g.text for g in self.chat_generations(conversations, decoding)]

    def chat_generations(self, conversations: Sequence[Messages], decoding: Decoding,
                         top_logprobs: int = 0, on_token: OnToken | None = None) -> list[Generation]:
        """:meth:`chat` with token ids, log-probs and counts (``on_token`` as in :meth:`explain_generations`)."""
        if not conversations:
            return []
        pad = int(self.tokenizer.pad_token_id)
        limit = self.config.max_context
        prompts = [[pad] + self.tokenizer.encode(self.chat_prompt(m), add_special_tokens=False)[-limit:]
                   for m in conversations]
        lengths = [len(p) for p in prompts]
        rows = _power_of_two(len(prompts))
        prompts += [prompts[0]] * (rows - len(prompts))
        width = prompt.pick_bucket(max(map(len, prompts)), self._buckets_for_length(max(map(len, prompts))))
        ids = np.full((rows, width), pad, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        embeds = self.model.llm.embed(jnp.asarray(ids))
        return self._generate(embeds, mask, lengths, decoding, top_logprobs, on_token)

    def _buckets_for_length(self, length: int) -> tuple[int, ...]:
        if length <= self.buckets[-1]:
            return self.buckets
        return (*self.buckets, -(-length // 256) * 256)

    def _buckets_for(self, samples: Sequence[prompt.Sample]) -> tuple[int, ...]:
        return self._buckets_for_length(max(len(s) for s in samples))


def _answer_tokens(on_token: OnToken, rows: int, eos: Sequence[int]) -> OnStep:
    """Per-step callback of :func:`generate` -> ``on_token`` for each real row's tokens before its EOS."""
    finished = [False] * rows

    def on_step(step: Step) -> None:
        for row in range(rows):
            token = int(step.tokens[row])
            finished[row] = finished[row] or token in eos
            if not finished[row]:
                top = list(zip(map(int, step.top_ids[row]), map(float, step.top_logprobs[row])))
                on_token(row, token, float(step.logprobs[row]), top)

    return on_step


def load(
    checkpoint: str | Path, *, tokenizer: str | Path | None = None, step: int | None = None,
    mesh: Mesh | None = None, dtype: str | None = None,
) -> Explainer:
    """Build the model a checkpoint describes sharded on ``mesh`` (default: FSDP over every local device),
    fill its weights (:mod:`xemogpt_jax.loading`), fold LoRA in, and pick up the tokenizer.

    ``dtype`` (``bfloat16``/``float32``) overrides the run's compute dtype; parameters stay as stored.
    """
    found = loading.open_checkpoint(checkpoint, step)
    run = found.run if dtype is None else {**found.run, "dtype": dtype}
    text_tokenizer = qwen3_params.load_tokenizer(_tokenizer_folder(found.directory, run, tokenizer))
    mesh = mesh or sharding.make_mesh((1, -1, 1), devices=jax.local_devices())
    model = loading.load_xemogpt(found, run_config.xemogpt_config(run, text_tokenizer), mesh)
    lora_lib.merge_lora(model)
    prepare_for_decoding(model.llm, mesh.devices.flat[0].platform)
    buckets = run.get("data", {}).get("length_buckets", prompt.DEFAULT_BUCKETS)
    return Explainer(model, text_tokenizer, buckets=buckets)
