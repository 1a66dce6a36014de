"""``make demo``'s housekeeping: starting over deletes only what the demo wrote."""

from xemogpt_jax import demo


def test_clear_removes_the_demo_outputs_and_keeps_other_files(tmp_path):
    for name in ("world/train", "stage1/checkpoints", "stage3_scratch"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "report.txt").write_text("old report")
    (tmp_path / "report.html").write_text("old page")
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "mine").mkdir()
    demo.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]
