"""K-Score on a hand-built set, against numbers worked out by hand from the spec's formula."""

from __future__ import annotations

import pytest

from gsjax.eval.kscore import JudgedSample, kscore_report


def judged(id_, category, difficulty, f=None, v=None, t=None, a=None, na=False):
    if f is None:
        return JudgedSample(id_, category, difficulty, None, "judge_failed: invalid_json after 20 attempt(s)")
    scores = {"faithfulness": f, "visual_correctness": v, "text_accuracy": 0.5 if na else t, "aesthetics": a}
    if na:
        scores["text_accuracy_na"] = True
    return JudgedSample(id_, category, difficulty, scores)


SAMPLES = [
    judged("a", "biology", "easy", 1, 0.5, 1, 1),
    judged("b", "physics", "hard", 0.5, 0, None, 0, na=True),
    judged("c", "history", "easy"),  # failed
    judged("d", "anime", "easy", 1, 1, 0, 1),
    judged("e", "Film", "hard", 0, 0.5, 0.5, 0.5),  # categories compare lower-cased
    judged("x", "cooking", "easy", 1, 1, 1, 1),  # unknown category: excluded from everything
]

# By hand. Upstream (failures excluded):
#   S&K {a, b}: f (1+.5)/2=.75, v (.5+0)/2=.25, t over non-N/A {a}=1, a (1+0)/2=.5
#               -> .1*.75 + .4*.25 + .4*1 + .1*.5 = .075 + .1 + .4 + .05 = .625
#   Pop {d, e}: f .5, v .75, t (0+.5)/2=.25, a .75 -> .05 + .3 + .1 + .075 = .525
#   K = 100 * (.625 + .525) / 2 = 57.5
# Strict (c counts as zeros, text needed):
#   S&K {a, b, c}: f 1.5/3=.5, v .5/3=.1667, t {a, c}=(1+0)/2=.5, a 1/3=.3333
#               -> .05 + .06668 + .2 + .03333 = .35001 -> .35
#   Pop unchanged .525; K = 100 * (.35 + .525) / 2 = 43.75


def test_headline_scores_match_the_hand_calculation():
    report = kscore_report(SAMPLES)
    up, strict = report["upstream"], report["strict"]
    assert up["groups"]["science_and_knowledge"] == {"faithfulness": 0.75, "visual_correctness": 0.25,
                                                     "text_accuracy": 1.0, "aesthetics": 0.5, "overall": 0.625,
                                                     "count": 2}
    assert up["groups"]["pop_culture_and_news"]["overall"] == pytest.approx(0.525)
    assert up["overall_avg"]["overall"] == pytest.approx(0.575) and up["overall_avg"]["count"] == 4
    assert up["overall_avg"]["faithfulness"] == pytest.approx((0.75 + 0.5) / 2)
    assert report["kscore_upstream"] == 57.5
    sk = strict["groups"]["science_and_knowledge"]
    assert (sk["faithfulness"], sk["visual_correctness"], sk["text_accuracy"], sk["aesthetics"], sk["count"]) == (
        0.5, 0.1667, 0.5, 0.3333, 3)
    assert sk["overall"] == pytest.approx(0.35)
    assert report["kscore_strict"] == 43.75


def test_failures_and_unknown_categories_are_counted_and_named():
    report = kscore_report(SAMPLES)
    assert report["samples"] == 6
    assert report["failures"] == {"count": 1, "by_reason": {"judge_failed": 1}, "ids": ["c"]}
    assert report["unknown_category"] == {"count": 1, "ids": ["x"]}


def test_per_category_and_per_difficulty():
    report = kscore_report(SAMPLES)
    cats = report["per_category"]
    assert list(cats) == ["anime", "film", "biology", "history", "physics"]  # grouped, then alphabetical
    # biology {a}: .1 + .2 + .4 + .1 = .8; history {c}: strict all zero over 1 sample, upstream empty.
    assert cats["biology"]["upstream"]["overall"] == pytest.approx(0.8)
    assert cats["history"]["strict"]["count"] == 1 and cats["history"]["strict"]["overall"] == 0.0
    assert cats["history"]["upstream"]["count"] == 0
    # physics {b}: text N/A only -> group text mean defaults to 0.5: .05 + 0 + .2 + 0 = .25
    assert cats["physics"]["upstream"]["overall"] == pytest.approx(0.25)
    diff = report["per_difficulty"]
    # easy upstream: S&K {a} .8, Pop {d} .1+.4+0+.1=.6 -> 70; strict: S&K {a,c}: .05+.1+.2+.05=.4 -> (.4+.6)/2 -> 50
    assert diff["easy"]["upstream"]["kscore"] == 70.0 and diff["easy"]["strict"]["kscore"] == 50.0
    # hard: S&K {b} .25, Pop {e} 0+.2+.2+.05=.45 -> 35 in both conventions (no failures)
    assert diff["hard"]["upstream"]["kscore"] == 35.0 and diff["hard"]["strict"]["kscore"] == 35.0


def test_group_score_is_not_the_mean_of_per_sample_overalls():
    # One N/A sample (per-sample overall uses t = .5) and one text sample with t = 0.
    samples = [judged("1", "art", None, 1, 1, None, 1, na=True), judged("2", "art", None, 1, 1, 0, 1)]
    report = kscore_report(samples)
    # Group: t mean over non-N/A = 0 -> .1 + .4 + 0 + .1 = .6; per-sample mean would be (.8 + .6)/2 = .7
    assert report["upstream"]["groups"]["science_and_knowledge"]["overall"] == pytest.approx(0.6)
    # Macro average with an empty group: (.6 + 0) / 2
    assert report["kscore_upstream"] == 30.0
    assert list(report["per_difficulty"]) == ["unspecified"]


def test_empty_input_scores_zero():
    report = kscore_report([])
    assert report["kscore_strict"] == 0.0 and report["kscore_upstream"] == 0.0
