"""``make demo``'s housekeeping: starting over deletes only what the demo wrote."""

from xemogpt_jax import demo


def test_clear_removes_the_demo_outputs_and_keeps_other_files(tmp_path):
    for name in ("world/train", "stage1/checkpoints", "stage3_scratch"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "report.txt").write_text("old report")
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "mine").mkdir()
    demo.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


def test_exact_cue_recall_counts_word_for_word_cues_per_axis():
    truth = {"a": {"visual": ["the brows are raised", "the eyes are wide"], "auditory": ["the pitch is rising"]},
             "b": {"visual": ["the head is still"], "auditory": []}}
    predicted = {"a": {"visual": ["The brows are raised.", "the eyes are narrowed"],
                       "auditory": ["the pitch is falling"]},
                 "b": {"visual": ["The head is still"], "auditory": ["there is laughter"]}}
    recall = demo.exact_cue_recall(predicted, truth)
    assert recall == {"visual": 2 / 3, "auditory": 0.0}
