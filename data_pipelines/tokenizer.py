"""A small byte-level BPE tokenizer trained on the synthetic world's own text, saved as a HF tokenizer folder.

No pretrained tokenizer is available offline, yet the tiny configurations should exercise the real path
(``transformers.AutoTokenizer.from_pretrained(dir)`` -> ``encode`` -> ids). Byte-level BPE (the scheme of
the Qwen tokenizers) never produces an unknown token, so subtitles outside the training text still round-trip.

Special tokens: ``<|pad|>`` (id 0; serves as BOS, see xemogpt_jax.prompt), ``<|endoftext|>`` (id 1, EOS) and
``<unk>`` (id 2, kept so the tokenizer declares one; byte-level BPE never emits it). The prompt template's
placeholders (``<AudioHere>``, ``<Video>``, ...) stay ordinary text, as in the reference, but the training
text includes the template so they become a few tokens each.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from xemogpt_jax.prompt import INFERENCE_INSTRUCTION, PROMPT_TEMPLATE

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
DEFAULT_VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 4096


def prompt_texts() -> list[str]:
    """The template (with its placeholders) and the instruction, so the tokenizer learns them."""
    filled = PROMPT_TEMPLATE.format(subtitle="", instruction=INFERENCE_INSTRUCTION)
    return [PROMPT_TEMPLATE, INFERENCE_INSTRUCTION, filled]


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` plus the prompt text; return it wrapped as a HF fast tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*prompt_texts(), *texts], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )


def train_world_tokenizer(out: str | Path, texts: Iterable[str],
                          vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train on ``texts`` and save to ``out`` (loadable with ``AutoTokenizer.from_pretrained(out)``)."""
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(str(out))
    return tokenizer
