"""Turn free-text emotion descriptions into EmoCue-360 cue lists (``emocue360 extract``).

Backends are callables ``chat(messages) -> str`` (the reply text, expected to be a JSON object):
- ``openai``: any OpenAI-compatible ``{base_url}/chat/completions`` endpoint (``--base-url`` or
  ``OPENAI_BASE_URL``, e.g. ``https://api.deepseek.com/v1``; key from ``--api-key`` or
  ``OPENAI_API_KEY``, never printed), JSON response mode, our prompt with a one-shot example.
- ``local``: ``xemogpt_jax.infer.chat_completion(messages, checkpoint=DIR) -> str`` once that module
  exists; needs ``--checkpoint``.
- ``rules``: no model at all, see :func:`rules_cues` for what it can and cannot do.

Requests run on a bounded thread pool, each retried with exponential backoff on transport errors,
HTTP errors and malformed replies. Every success is written to a cache file keyed by (backend,
model, prompt, description), so a rerun only pays for what failed. A sample that still fails is
reported by name with its last error, left out of the cue file, and the run completes (exit 3).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

AXES = ("visual", "auditory", "emotional")
Messages = list[dict[str, str]]
Chat = Callable[[Messages], str]

SYSTEM_PROMPT = """You extract emotional cues from a description of a video clip.
Return a JSON object with exactly three keys, "visual", "auditory" and "emotional", each a list of short,
atomic, self-contained statements in English:
- "visual": what is seen (facial expressions, gaze, gestures, posture, scene), one observation per item;
- "auditory": what is heard in the voice or sound (tone, pitch, speed, volume, sighs, laughter, music);
  do not quote or paraphrase the subtitle or spoken words here;
- "emotional": the emotional states or inferences the description states.
Split compound sentences into separate items, keep each item faithful to the description, add nothing
that is not in it, and use an empty list for an axis the description does not cover."""

EXAMPLE_DESCRIPTION = (
    "In the video, the woman frowns and her eyes are red; she looks down and wipes her face. "
    "In the audio, her voice is low and trembling, and she speaks slowly with long pauses. "
    "The subtitle says she lost her job. Overall, she appears sad and disappointed."
)
EXAMPLE_CUES = {
    "visual": ["The woman frowns.", "Her eyes are red.", "She looks down.", "She wipes her face."],
    "auditory": ["Her voice is low.", "Her voice is trembling.", "She speaks slowly.", "She makes long pauses."],
    "emotional": ["She appears sad.", "She appears disappointed."],
}


def build_messages(description: str, system_prompt: str = SYSTEM_PROMPT) -> Messages:
    """System prompt, one worked example, then the description to process."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": EXAMPLE_DESCRIPTION},
        {"role": "assistant", "content": json.dumps(EXAMPLE_CUES)},
        {"role": "user", "content": description},
    ]


class MalformedReply(ValueError):
    """The backend answered, but not with a cue object."""


def parse_cues(reply: str) -> dict[str, list[str]]:
    """A reply's JSON object as cue lists; tolerates ```json fences, refuses anything else."""
    text = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MalformedReply(f"reply is not JSON ({error.msg} at char {error.pos}): {reply[:80]!r}") from None
    if not isinstance(data, dict) or not any(axis in data for axis in AXES):
        raise MalformedReply(f"reply has none of the keys {AXES}: {reply[:80]!r}")
    cues: dict[str, list[str]] = {}
    for axis in AXES:
        if axis not in data:
            continue
        values = data[axis]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise MalformedReply(f"{axis!r} is not a list of strings: {str(values)[:80]!r}")
        cues[axis] = [v.strip() for v in values if v.strip()]
    return cues


def openai_chat(
    base_url: str, api_key: str | None, model: str, timeout: float = 60.0, temperature: float = 0.0
) -> Chat:
    """POST to ``{base_url}/chat/completions`` with JSON response mode; returns the reply text."""
    url = base_url.rstrip("/") + "/chat/completions"

    def chat(messages: Messages) -> str:
        body = {
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "response_format": {"type": "json_object"},
        }
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise MalformedReply(f"response has no choices[0].message.content: {str(payload)[:80]!r}") from None

    return chat


def local_chat(checkpoint: str | None) -> Chat:
    """Our own model as the extractor, through ``xemogpt_jax.infer.chat_completion``."""
    if not checkpoint:
        raise SystemExit("local backend needs --checkpoint")
    try:
        chat_completion = importlib.import_module("xemogpt_jax.infer").chat_completion
    except (ImportError, AttributeError):
        raise SystemExit("local backend: xemogpt_jax.infer.chat_completion is not available in this version") from None
    return lambda messages: chat_completion(messages, checkpoint=checkpoint)


# ---- rules backend -------------------------------------------------------------------------

_SECTION_STARTS = (
    ("visual", re.compile(r"^(in|from) the (video|visual|image|frames?)\b[\s,:]*", re.IGNORECASE)),
    ("auditory", re.compile(r"^(in|from) the (audio|speech|voice|sound)\b[\s,:]*", re.IGNORECASE)),
    (
        "emotional",
        re.compile(
            r"^(overall|therefore|thus|in summary|in conclusion|to sum up|taken together|combining|"
            r"based on|considering|given)\b[\s,:]*",
            re.IGNORECASE,
        ),
    ),
)
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
# "The audio is not available." and the like: closes a section without being a cue.
_ABSENT_MODALITY = re.compile(
    r"^(the )?(video|visual|image|frames?|audio|speech|voice|sound)\b.*\b(not available|unavailable|missing|absent)\b",
    re.IGNORECASE,
)
# An inference anywhere in a sentence makes it (and what follows) emotional.
_INFERENCE = re.compile(
    r"\b(is|are) (suggested|indicated|implied|revealed) by\b|\b(most|very) likely\b|\bpoints? to\b",
    re.IGNORECASE,
)
# Clause boundaries inside a sentence: ", and" / ", so" / ", but", or a comma opening a new clause
# ("..., the brows are raised"); a comma inside a noun phrase ("the high, rising pitch") stays.
_CLAUSE_END = re.compile(
    r",\s+(?:(?:and|so|but)\s+|(?=(?:the|there|his|her|their|its|he|she|they|it|i|we)\b))", re.IGNORECASE
)
_AS_WELL_AS = re.compile(r"\s+as well as\s+", re.IGNORECASE)
_AGENT = re.compile(r"^(.*?\bby\s+)", re.IGNORECASE)


def split_clauses(sentence: str) -> list[str]:
    """A sentence's atomic clauses, without the joining words and the final punctuation.

    "X is suggested by A as well as B" gives "X is suggested by A" and "X is suggested by B" (the
    shared "... by" head is repeated); other coordinations are split only at a comma.
    """
    clauses = []
    for clause in _CLAUSE_END.split(sentence.strip().rstrip(".!?;").strip()):
        parts = _AS_WELL_AS.split(clause)
        head = _AGENT.match(parts[0])
        clauses.append(parts[0])
        clauses += [(head.group(1) if head else "") + part for part in parts[1:]]
    return [c.strip() for c in clauses if c.strip()]


def rules_cues(description: str) -> dict[str, list[str]]:
    """Deterministic cues for descriptions written as "In the video, ... In the audio, ... Overall, ...".

    Sentences (split at . ! ? ;) go to the section opened by the last marker seen: "In/From the
    video/visual/frames" -> visual, "In/From the audio/speech/voice/sound" -> auditory, and a
    concluding opener ("Overall", "Therefore", "In summary", "Based on", ...) -> emotional. The
    marker itself is removed from the cue. A sentence stating an inference ("... is suggested by
    ...", "most likely", "points to") is emotional, and so is what follows it; one saying a modality
    is not available is no cue and closes the section. Each sentence is split into clauses
    (:func:`split_clauses`), each one cue without its final punctuation. Limits: English markers
    only; text before the first marker is dropped; emotion words inside other visual or audio
    sentences stay there; abbreviations such as "Mr." split sentences; no coreference ("she" stays
    "she"). Use an LLM backend for anything free-form.
    """
    cues: dict[str, list[str]] = {axis: [] for axis in AXES}
    section: str | None = None
    for sentence in _SENTENCE_END.split(description.strip()):
        if _ABSENT_MODALITY.match(sentence):
            section = None
            continue
        for axis, pattern in _SECTION_STARTS:
            match = pattern.match(sentence)
            if match:
                section = axis
                sentence = sentence[match.end() :]
                break
        if _INFERENCE.search(sentence):
            section = "emotional"
        if section is not None:
            cues[section] += [clause[0].upper() + clause[1:] for clause in split_clauses(sentence)]
    return cues


# ---- running many descriptions -------------------------------------------------------------


@dataclass
class ExtractionRun:
    cues: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    cached: int = 0
    requested: int = 0


class CueCache:
    """A JSON file of successful extractions, rewritten atomically after each new one."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict[str, list[str]]] = {}
        if path is not None and path.is_file():
            self.entries = json.loads(path.read_text(encoding="utf-8"))
        self._lock = threading.Lock()

    @staticmethod
    def key(identity: str, messages: Messages) -> str:
        return hashlib.sha256(json.dumps([identity, messages], sort_keys=True).encode()).hexdigest()

    def put(self, key: str, value: dict[str, list[str]]) -> None:
        with self._lock:
            self.entries[key] = value
            if self.path is not None:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(self.entries, ensure_ascii=False), encoding="utf-8")
                tmp.replace(self.path)


def _with_retries(chat: Chat, messages: Messages, retries: int, backoff: float) -> dict[str, list[str]]:
    attempt = 0
    while True:
        try:
            return parse_cues(chat(messages))
        except (OSError, ValueError):  # transport, HTTP, timeouts, non-JSON bodies, malformed cue objects
            if attempt >= retries:
                raise
            time.sleep(backoff * 2**attempt)
            attempt += 1


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"connection failed: {error.reason}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}"


def extract_all(
    descriptions: Mapping[str, str],
    chat: Chat,
    *,
    identity: str,
    system_prompt: str = SYSTEM_PROMPT,
    workers: int = 8,
    retries: int = 3,
    backoff: float = 1.0,
    cache: CueCache | None = None,
) -> ExtractionRun:
    """Cues for every description; ``identity`` (backend + model) separates cache entries."""
    cache = cache or CueCache(None)
    run = ExtractionRun()
    todo: dict[str, tuple[str, Messages]] = {}
    for name, text in descriptions.items():
        messages = build_messages(text, system_prompt)
        key = CueCache.key(identity, messages)
        if key in cache.entries:
            run.cues[name] = cache.entries[key]
            run.cached += 1
        else:
            todo[name] = (key, messages)
    run.requested = len(todo)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_with_retries, chat, m, retries, backoff): (n, k) for n, (k, m) in todo.items()}
        for future in concurrent.futures.as_completed(futures):
            name, key = futures[future]
            try:
                cues = future.result()
            except Exception as error:  # one sample's failure must not stop the run; it is reported by name
                run.failures[name] = _describe(error)
                continue
            cache.put(key, cues)
            run.cues[name] = cues
    run.cues = {name: run.cues[name] for name in descriptions if name in run.cues}
    return run


def read_descriptions(path: str | Path, name_column: str, text_column: str) -> dict[str, str]:
    """``{name: description}`` from a CSV / JSON / JSONL annotation file (the data builder's reader)."""
    from data_pipelines.annotations import Annotation, Columns, read_annotations

    rows = read_annotations(path, Columns(clip_id=name_column, description=text_column))
    bad = [row for row in rows if not isinstance(row, Annotation)]
    if bad:
        print(f"{path}: {len(bad)} unreadable rows skipped, first: {bad[0].reason}", file=sys.stderr)
    return {row.clip_id: row.description for row in rows if isinstance(row, Annotation)}


def _chat_for(args: argparse.Namespace) -> tuple[Chat, str]:
    if args.backend == "openai":
        base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise SystemExit("openai backend needs --base-url or OPENAI_BASE_URL (e.g. https://api.deepseek.com/v1)")
        api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
        return openai_chat(base_url, api_key, args.model, args.timeout), f"openai:{base_url}:{args.model}"
    return local_chat(args.checkpoint), f"local:{args.checkpoint}"


def _extract_command(args: argparse.Namespace) -> int:
    descriptions = read_descriptions(args.input, args.name_column, args.text_column)
    if args.backend == "rules":
        run = ExtractionRun(cues={name: rules_cues(text) for name, text in descriptions.items()})
    else:
        chat, identity = _chat_for(args)
        system_prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else SYSTEM_PROMPT
        cache_path = Path(args.cache) if args.cache else Path(str(args.out) + ".cache.json")
        run = extract_all(
            descriptions,
            chat,
            identity=identity,
            system_prompt=system_prompt,
            workers=args.workers,
            retries=args.retries,
            backoff=args.backoff,
            cache=CueCache(cache_path),
        )
    Path(args.out).write_text(json.dumps(run.cues, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"{len(run.cues)}/{len(descriptions)} samples extracted ({run.cached} from cache, {run.requested} requested)")
    for name, reason in sorted(run.failures.items()):
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    if run.failures:
        failures_path = Path(str(args.out) + ".failures.json")
        failures_path.write_text(json.dumps(run.failures, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"{len(run.failures)} samples failed; listed in {failures_path}", file=sys.stderr)
        return 3
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``extract`` sub-command's flags."""
    parser.add_argument("--in", dest="input", required=True, help="descriptions (.csv, .json or .jsonl)")
    parser.add_argument("--out", required=True, help="cue file to write")
    parser.add_argument("--backend", choices=("openai", "local", "rules"), required=True)
    parser.add_argument("--name-column", default="name", help="column / key holding the sample name")
    parser.add_argument("--text-column", default="english", help="column / key holding the description")
    parser.add_argument("--base-url", help="OpenAI-compatible base URL ending in /v1 (default: $OPENAI_BASE_URL)")
    parser.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY); never printed")
    parser.add_argument("--model", default="deepseek-chat")
    parser.add_argument("--prompt-file", help="replace the system prompt (the one-shot example stays)")
    parser.add_argument("--workers", type=int, default=16, help="parallel requests")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--cache", help="cache file (default: OUT.cache.json)")
    parser.add_argument("--checkpoint", help="model checkpoint for --backend local")
    parser.set_defaults(run=_extract_command)
