"""Faithfulness metrics on hand-written cue lists and explanations (the world's templates, typed out)."""

import pytest

from xemogpt_jax import faithfulness
from xemogpt_jax.cue_extraction import rules_cues

HAPPY_FACE = ["the person is smiling", "the brows are relaxed", "the eyes are wide", "the head is still",
              "the lighting is bright"]
SAD_FACE = ["the person is frowning", "the brows are raised", "the eyes are narrowed", "the head is nodding",
            "the lighting is dim"]
HAPPY_VOICE = ["the pitch is low", "the pitch is falling", "the voice is loud", "the speech is fast",
               "there is laughter"]
SAD_VOICE = ["the pitch is high", "the pitch is falling", "the voice is soft", "the speech is slow"]
TRUTH = {
    "h": {"visual": HAPPY_FACE, "auditory": HAPPY_VOICE, "emotional": [
        "the person is most likely happy", "happiness is suggested by the smile",
        "happiness is suggested by the laughter"]},
    "s": {"visual": SAD_FACE, "auditory": SAD_VOICE, "emotional": [
        "the person is most likely sad", "sadness is suggested by the frown",
        "sadness is suggested by the soft, slow speech"]},
    "s_video_only": {"visual": SAD_FACE, "auditory": [], "emotional": [
        "the person is most likely sad", "sadness is suggested by the frown"]},
    "conflict": {"visual": SAD_FACE, "auditory": HAPPY_VOICE, "emotional": [
        "sadness is suggested by the frown", "happiness is suggested by the laughter",
        "the face suggests sadness while the voice suggests happiness"]},
    "h2": {"visual": HAPPY_FACE, "auditory": HAPPY_VOICE, "emotional": [
        "the person is most likely happy", "happiness is suggested by the smile",
        "happiness is suggested by the laughter"]},
}
# What clip h's frames with clip s's audio show, written out from the world's templates.
HAPPY_FRAMES_SAD_AUDIO = {
    "visual": HAPPY_FACE,
    "auditory": SAD_VOICE,
    "emotional": ["happiness is suggested by the smile", "sadness is suggested by the soft, slow speech",
                  "the face suggests happiness while the voice suggests sadness"],
}
HAPPY_FRAMES_SAD_AUDIO_TEXT = (
    "In the video, the person is smiling, the brows are relaxed, the eyes are wide, the head is still, and the "
    "lighting is bright. In the audio, the pitch is high, the pitch is falling, the voice is soft, and the speech "
    "is slow. Happiness is suggested by the smile, and sadness is suggested by the soft, slow speech, so the face "
    "suggests happiness while the voice suggests sadness."
)


def test_exact_cue_recall_counts_word_for_word_cues_per_axis():
    truth = {"a": {"visual": ["the brows are raised", "the eyes are wide"], "auditory": ["the pitch is rising"]},
             "b": {"visual": ["the head is still"], "auditory": []}}
    predicted = {"a": {"visual": ["The brows are raised.", "the eyes are narrowed"],
                       "auditory": ["the pitch is falling"]},
                 "b": {"visual": ["The head is still"], "auditory": ["there is laughter"]}}
    assert faithfulness.exact_cue_recall(predicted, truth) == {"visual": 2 / 3, "auditory": 0.0}


def test_groups_and_swaps_pair_agreeing_audio_video_clips_with_another_emotion():
    names = list(TRUTH)
    assert faithfulness.groups(TRUTH, names) == {"normal": ["h", "s", "s_video_only", "h2"],
                                                 "conflict": ["conflict"]}
    # h -> s (next of another emotion); s -> h2 (cyclic: after s come h2, then h); h2 -> s.
    assert faithfulness.swaps(TRUTH, names, "audio") == [
        faithfulness.Swap("h+audio:s", frames_from="h", audio_from="s"),
        faithfulness.Swap("s+audio:h2", frames_from="s", audio_from="h2"),
        faithfulness.Swap("h2+audio:s", frames_from="h2", audio_from="s"),
    ]
    assert faithfulness.swaps(TRUTH, names, "frames")[0] == faithfulness.Swap("h+frames:s", "s", "h")
    with pytest.raises(ValueError, match="replace must be one of"):
        faithfulness.swaps(TRUTH, names, "subtitle")


def test_the_ground_truth_explanation_of_a_swapped_clip_scores_full_recall_and_no_hallucination():
    swap = faithfulness.Swap("h+audio:s", frames_from="h", audio_from="s")
    truth = faithfulness.swap_truth(swap, TRUTH)
    assert {axis: sorted(cues) for axis, cues in truth.items()} == {
        axis: sorted(cues) for axis, cues in HAPPY_FRAMES_SAD_AUDIO.items()}
    predicted = {swap.name: rules_cues(HAPPY_FRAMES_SAD_AUDIO_TEXT)}
    assert faithfulness.exact_cue_recall(predicted, {swap.name: truth}) == {
        "visual": 1.0, "auditory": 1.0, "emotional": 1.0}
    assert faithfulness.hallucination_rate(predicted, {swap.name: truth}) == {"visual": 0.0, "auditory": 0.0}


def test_an_explanation_naming_the_other_modalitys_cues_hallucinates_at_rate_one():
    # Happy frames, sad audio, described the other way round: a frowning face and a soft, slow voice read off
    # the voice's emotion, laughter read off the face's.
    swap = faithfulness.Swap("h+audio:s", frames_from="h", audio_from="s")
    truth = {swap.name: faithfulness.swap_truth(swap, TRUTH)}
    text = ("In the video, the person is frowning. In the audio, there is laughter. "
            "Sadness is suggested by the frown, so the person is most likely sad.")
    predicted = {swap.name: rules_cues(text)}
    assert predicted[swap.name]["visual"] == ["The person is frowning"]
    assert faithfulness.hallucination_rate(predicted, truth) == {"visual": 1.0, "auditory": 1.0}
    assert faithfulness.exact_cue_recall(predicted, truth)["visual"] == 0.0


def test_verdicts_tell_hallucinated_from_merely_wrong_cues():
    stated = {"visual": ["the person is smiling", "the person is frowning", "the lighting is bright"],
              "auditory": ["there is laughter", "the voice is soft"], "emotional": []}
    marks = faithfulness.verdicts("conflict", stated, TRUTH["conflict"])
    assert marks["visual"] == [("the person is smiling", "hallucinated"), ("the person is frowning", "right"),
                               ("the lighting is bright", "wrong")]
    # the sad face's telltale auditory cues are "soft" and "slow"
    assert marks["auditory"] == [("there is laughter", "right"), ("the voice is soft", "hallucinated")]
    rate = faithfulness.hallucination_rate({"conflict": stated}, {"conflict": TRUTH["conflict"]})
    assert rate == {"visual": 1 / 3, "auditory": 1 / 2}
    # without audio nothing can be taken from it: a video-only clip is not counted
    assert faithfulness.hallucination_rate({"s_video_only": stated}, {"s_video_only": TRUTH["s_video_only"]}) == {}
    missed = faithfulness.missed(stated, TRUTH["conflict"])
    assert missed["visual"] == SAD_FACE[1:] and missed["auditory"] == HAPPY_VOICE[:4]


def test_table_row_and_text_table():
    f1 = {axis: {"f1": value} for axis, value in zip(faithfulness.AXES, (0.9, 0.8, None))}
    row = faithfulness.table_row(f1, {"h": TRUTH["h"]}, {"h": TRUTH["h"]})
    assert row == [0.9, 0.8, None, 1.0, 1.0, 1.0, 0.0, 0.0]
    text = faithfulness.format_table({"normal clips": row}, {"normal clips": 1})
    assert text.splitlines()[1].split() == ["normal", "clips", "(1)", "0.900", "0.800", "-", "1.000", "1.000",
                                            "1.000", "0.000", "0.000"]
