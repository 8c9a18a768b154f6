"""Image and text judges: normalisation and formulas by hand, and the request each one sends."""

from __future__ import annotations

import json

import pytest

from gsjax.rewards.image_judge import ImageJudge, parse_image_scores
from gsjax.rewards.judge_client import InvalidJudgeOutput, JudgeClient, JudgeConfig
from gsjax.rewards.text_judge import TextJudge, format_answer_text, parse_text_score, snap_to_level
from tests.rewards.fake_servers import LoopbackServer, chat_json, image_parts, png_bytes, scripted, user_text


def scores(**overrides):
    base = {"rationale": "Constraints: a, b.", "faithfulness": 1, "visual_correctness": 0.5,
            "text_accuracy": 1, "aesthetics": 0.5, "text_accuracy_na": False}
    return {**base, **overrides}


def client(server: LoopbackServer, **kw) -> JudgeClient:
    return JudgeClient(JudgeConfig(base_url=server.base_url, model="gpt-4.1", max_attempts=3, **kw), sleep=lambda s: None)


def test_overall_is_the_weighted_rounded_formula():
    # 0.1*1 + 0.4*0.5 + 0.4*1 + 0.1*0.5 = 0.1 + 0.2 + 0.4 + 0.05 = 0.75
    assert parse_image_scores(scores()).overall == 0.75
    # Values are not snapped to the grid, only rounded to 2 places: 0.1*0.333 -> f = 0.33.
    s = parse_image_scores(scores(faithfulness=0.333, visual_correctness=0, text_accuracy=0, aesthetics=0))
    assert s.faithfulness == 0.33 and s.overall == 0.03


@pytest.mark.parametrize("flag", [True, "true", "True", 1])
def test_text_not_needed_counts_as_half(flag):
    s = parse_image_scores(scores(text_accuracy=0, text_accuracy_na=flag))
    # t = 0.5 when N/A: 0.1 + 0.2 + 0.2 + 0.05 = 0.55
    assert s.text_accuracy_na and s.text_accuracy == 0.5 and s.overall == 0.55
    assert s.as_record()["text_accuracy_na"] is True


def test_strict_parsing_rejects_what_the_rubric_forbids():
    for bad in (scores(faithfulness=1.5), scores(aesthetics=-0.5), scores(visual_correctness="high"),
                scores(text_accuracy="n/a"), {k: v for k, v in scores().items() if k != "aesthetics"}):
        with pytest.raises(InvalidJudgeOutput):
            parse_image_scores(bad)


def test_lenient_parsing_is_upstreams_clip_and_default():
    s = parse_image_scores({"faithfulness": 2, "visual_correctness": -1, "text_accuracy": "n/a"}, strict=False)
    # f clipped to 1, v to 0, a missing -> 0, t unparsable -> N/A (0.5): 0.1 + 0 + 0.2 + 0 = 0.3
    assert (s.faithfulness, s.visual_correctness, s.aesthetics, s.text_accuracy_na, s.overall) == (1, 0, 0, True, 0.3)
    with pytest.raises(InvalidJudgeOutput, match="not numeric"):
        parse_image_scores(scores(faithfulness="good"), strict=False)


def test_record_cuts_the_rationale_and_omits_a_false_na_flag():
    record = parse_image_scores(scores(rationale="x" * 5000)).as_record()
    assert len(record["rationale"]) == 1000 and "text_accuracy_na" not in record


def test_image_judge_sends_prompt_generated_then_ground_truth():
    generated, truth = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    with LoopbackServer(scripted([chat_json(scores())])) as server:
        result = ImageJudge(client(server)).judge_image("3260", "The Eiffel tower at night", generated, truth)
    assert result.ok and result.value.overall == 0.75 and result.provenance()["backend"] == "openai-compatible"
    body = server.requests[0][1]
    assert "strict evaluator" in body["messages"][0]["content"]
    text = user_text(body)
    assert "3260" in text and "The Eiffel tower at night" in text and "Image 1" in text
    parts = image_parts(body)
    assert len(parts) == 2 and all(p["type"] == "image_url" for p in parts)
    assert parts[0]["image_url"]["url"] != parts[1]["image_url"]["url"]


@pytest.mark.parametrize(("x", "level"), [(0.0, 0.0), (0.125, 0.0), (0.13, 0.25), (0.375, 0.25), (0.6, 0.5),
                                          (0.625, 0.5), (0.63, 0.75), (0.875, 0.75), (0.9, 1.0), (1.0, 1.0)])
def test_text_score_snaps_to_the_nearest_level_ties_down(x, level):
    assert snap_to_level(x) == level


def test_text_score_validation():
    assert parse_text_score({"score": 0.7, "rationale": "Constraints: r"}).score == 0.75
    for bad in ({"score": "high"}, {"score": 1.3}, {}, {"score": True}):
        with pytest.raises(InvalidJudgeOutput):
            parse_text_score(bad)
    assert parse_text_score({"score": 1.3}, strict=False).score == 1.0


def test_text_judge_sees_answer_text_and_only_the_ground_truth():
    refs = [{"img_id": "IMG_001", "title": "Tower", "note": "night", "page_url": "http://p", "local_path": "/x.jpg"}]
    with LoopbackServer(scripted([chat_json({"rationale": "Constraints: c", "score": 0.5})])) as server:
        result = TextJudge(client(server)).judge_text("7", "task", png_bytes((1, 1, 1)), 'A "tower"', refs)
    assert result.ok and result.value.score == 0.5
    body = server.requests[0][1]
    assert len(image_parts(body)) == 1
    answer = format_answer_text('A "tower"', refs)
    assert answer in user_text(body)
    assert answer.startswith('"gen_prompt": "A \\"tower\\""\n"reference_images": ')
    listed = json.loads(answer.split('"reference_images": ', 1)[1])
    assert listed == [{"img_id": "IMG_001", "title": "Tower", "note": "night", "page_url": "http://p"}]
