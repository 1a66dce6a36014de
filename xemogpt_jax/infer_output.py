"""What ``infer`` writes for each clip: the explanation, a JSON record with its token log-probs, or the scores
of given explanations.

Kept apart from :mod:`xemogpt_jax.infer` so the single-clip and ``--batch`` paths share one
definition of each record, and the command's own code only parses arguments and walks clips.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xemogpt_jax import prompt
from xemogpt_jax.explainer import Clip, Decoding, Explainer


@dataclasses.dataclass(frozen=True)
class Output:
    """The instruction asked, and which record to write: text (default), ``as_json``, or scores of ``answers``."""

    instruction: str = prompt.INFERENCE_INSTRUCTION
    as_json: bool = False
    answers: tuple[str, ...] = ()

    @property
    def scoring(self) -> bool:
        return bool(self.answers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instruction", default=prompt.INFERENCE_INSTRUCTION,
                        help="the question asked about the clip (default: the release's inference instruction)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per clip: explanation, token_ids, token_logprobs, prompt_tokens, "
                             "generated_tokens, seconds")
    parser.add_argument("--score", action="append", default=[], metavar="TEXT",
                        help="no generation: teacher-forced log-likelihood of TEXT as the explanation (repeatable; "
                             "with --batch every clip is scored against every TEXT)")
    parser.add_argument("--score-file", type=Path, help="explanations to score, one per line")


def from_args(args: argparse.Namespace) -> Output:
    """The output the flags ask for; ValueError for an unreadable or empty ``--score-file``."""
    answers = list(args.score)
    if args.score_file is not None:
        try:
            answers += [line for line in args.score_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as error:
            raise ValueError(f"--score-file: {error}") from None
        if not answers:
            raise ValueError(f"--score-file {args.score_file} holds no explanation")
    return Output(instruction=args.instruction, as_json=args.json, answers=tuple(answers))


def records(model: Explainer, clips: Sequence[Clip], decoding: Decoding, output: Output) -> list[dict[str, Any]]:
    """One record per clip, computed as one batch; ``seconds`` is the clip's share of the batch's wall time."""
    clips = [dataclasses.replace(c, instruction=output.instruction) for c in clips]
    start = time.perf_counter()
    if output.scoring:
        pairs = [(clip, answer) for clip in clips for answer in output.answers]
        scores = model.score([c for c, _ in pairs], [a for _, a in pairs])
        per_clip = len(output.answers)
        out = [
            {"scores": [
                {"text": answer, "logprob": s.logprob, "token_ids": s.token_ids, "token_logprobs": s.token_logprobs}
                for answer, s in zip(output.answers, scores[i * per_clip : (i + 1) * per_clip])
            ]}
            for i in range(len(clips))
        ]
    else:
        generations = model.explain_generations(clips, decoding)
        out = [
            {"explanation": g.text, "token_ids": g.token_ids, "token_logprobs": g.token_logprobs,
             "prompt_tokens": g.prompt_tokens, "generated_tokens": g.generated_tokens}
            if output.as_json else {"explanation": g.text}
            for g in generations
        ]
    share = round((time.perf_counter() - start) / max(1, len(clips)), 4)
    return [{**record, "seconds": share} for record in out]
