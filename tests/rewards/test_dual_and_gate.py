"""Dual reward formula and modes, the gate's order and outcomes, and the episode pipeline."""

from __future__ import annotations

import pytest

from gsjax.rewards.dual import EpisodeRewarder, RewardConfig, combine
from gsjax.rewards.gate import check_gate
from gsjax.rewards.heuristic import HeuristicImageJudge, HeuristicTextJudge
from gsjax.rewards.image_judge import ImageJudge
from gsjax.rewards.judge_client import JudgeClient, JudgeConfig
from gsjax.rewards.text_judge import TextJudge
from tests.rewards.fake_servers import LoopbackServer, Reply, chat, chat_json, png_bytes


def test_dual_formula_and_modes():
    assert combine(0.6, 0.25, c=0.5) == pytest.approx(0.5 * 0.6 + 0.5 * 0.25)  # 0.425
    assert combine(0.6, 0.25, c=0.2) == pytest.approx(0.8 * 0.6 + 0.2 * 0.25)  # 0.53
    assert combine(0.6, None, c=0.0) == 0.6  # c = 0: R = S_img, text not needed
    assert combine(None, 0.75, c=1.0) == 0.75  # c = 1: image not needed
    assert combine(None, 0.75, c=3.0) == 0.75  # c is clamped to [0, 1]
    assert combine(0.6, 0.25, mode="image") == 0.6 and combine(None, 0.25, mode="text") == 0.25


def test_missing_component_gives_missing_reward_never_zero():
    assert combine(None, 0.5, c=0.5) is None
    assert combine(0.5, None, c=0.5) is None
    assert combine(None, 0.5, mode="image") is None
    assert combine(0.5, None, mode="text") is None


@pytest.fixture()
def files(tmp_path):
    gt = tmp_path / "gt.png"
    gt.write_bytes(png_bytes((0, 0, 255)))
    refs = []
    for i in range(5):
        ref = tmp_path / f"ref{i}.jpg"
        ref.write_bytes(png_bytes((i, i, i)))
        refs.append({"img_id": f"IMG_{i:03d}", "title": f"t{i}", "note": "", "local_path": str(ref)})
    return gt, refs


def gate(gt, prediction, **kw):
    return check_gate(question=kw.pop("question", "draw it"), gt_image=gt, prediction=prediction, **kw)


def test_gate_outcomes_in_spec_order(files, tmp_path):
    gt, refs = files
    ok = {"gen_prompt": "p", "reference_images": refs[:2]}
    assert gate(gt, ok).outcome == "pass" and len(gate(gt, ok).references) == 2
    cases = [
        (gate(gt, ok, termination="repeated_response"), "zero", "termination:repeated_response"),
        (gate(gt, ok, termination="error"), "missing", "termination:error"),
        (gate(tmp_path / "absent.png", ok), "missing", "gt_image_missing"),
        (gate(gt, ok, question="  "), "missing", "empty_question"),
        (gate(gt, None), "zero", "no_prediction"),
        (gate(gt, {**ok, "error": "agent crashed"}), "missing", "prediction_error"),
        (gate(gt, {**ok, "gen_prompt": ""}), "zero", "empty_gen_prompt"),
        (gate(gt, {"gen_prompt": "p", "reference_images": []}), "zero", "reference_count:0"),
        (gate(gt, {"gen_prompt": "p", "reference_images": refs[:4]}), "zero", "reference_count:4 not in [1, 3]"),
        (gate(gt, ok, judge_configured=False), "missing", "judge_not_configured"),
    ]
    for verdict, outcome, reason in cases:
        assert verdict.outcome == outcome and verdict.reason.startswith(reason), (verdict, reason)
    # Only references whose file exists count; max < min means max := min.
    gone = {"img_id": "IMG_9", "local_path": str(tmp_path / "nope.jpg")}
    assert gate(gt, {"gen_prompt": "p", "reference_images": [gone, refs[0]]}).references == (tmp_path / "ref0.jpg",)
    assert gate(gt, {"gen_prompt": "p", "reference_images": refs[:2]}, min_references=2, max_references=1).outcome == "pass"
    # Policy failure is checked after infrastructure: an empty question wins over an empty gen_prompt.
    assert gate(gt, {"gen_prompt": ""}, question="").reason == "empty_question"


class FakeGenerator:
    def __init__(self, failures: int = 0) -> None:
        self.calls: list[tuple[str, int]] = []
        self.failures = failures

    def generate(self, prompt, images):
        self.calls.append((prompt, len(images)))
        if len(self.calls) <= self.failures:
            raise ConnectionError("generator down")
        return png_bytes((0, 0, 250))


def rewarder(server, generator, **cfg):
    jc = JudgeClient(JudgeConfig(base_url=server.base_url, max_attempts=2), sleep=lambda s: None)
    return EpisodeRewarder(RewardConfig(**cfg), generator, ImageJudge(jc), TextJudge(jc), sleep=lambda s: None)


def route(image_reply: Reply, text_reply: Reply):
    """Answer the image judge and the text judge differently (they differ by image count)."""
    return lambda path, body: image_reply if len(body["messages"][1]["content"]) == 3 else text_reply


IMAGE_OK = chat_json({"rationale": "Constraints: c", "faithfulness": 1, "visual_correctness": 0.5,
                      "text_accuracy": 0.5, "aesthetics": 0.5, "text_accuracy_na": False})  # S_img = 0.55
TEXT_OK = chat_json({"rationale": "Constraints: c", "score": 0.75})


def test_episode_reward_blends_both_judges(files):
    gt, refs = files
    gen = FakeGenerator()
    with LoopbackServer(route(IMAGE_OK, TEXT_OK)) as server:
        out = rewarder(server, gen)(sample_id="1", question="q", gt_image=str(gt),
                                    prediction={"gen_prompt": "the prompt", "reference_images": refs[:3]})
    assert out.status == "scored" and out.image_reward == 0.55 and out.text_reward == 0.75
    assert out.reward == pytest.approx(0.5 * 0.55 + 0.5 * 0.75)
    assert gen.calls == [("the prompt", 3)] and out.generated_image is not None
    assert out.as_record()["image_judge"]["model"] == "gpt-4.1"


def test_judge_failure_makes_the_reward_missing_not_blended(files):
    gt, refs = files
    with LoopbackServer(route(chat("garbage"), TEXT_OK)) as server:
        out = rewarder(server, FakeGenerator())(sample_id="1", question="q", gt_image=str(gt),
                                                prediction={"gen_prompt": "p", "reference_images": refs[:1]})
    assert out.reward is None and out.status == "missing" and out.text_reward == 0.75
    assert out.reason.startswith("judge_failed:invalid_json after 2 attempt(s)")


def test_generation_is_retried_then_missing(files):
    gt, refs = files
    gen = FakeGenerator(failures=10)
    with LoopbackServer(route(IMAGE_OK, TEXT_OK)) as server:
        out = rewarder(server, gen, generation_attempts=3)(
            sample_id="1", question="q", gt_image=str(gt), prediction={"gen_prompt": "p", "reference_images": refs[:1]})
        assert server.count == 0
    assert out.reward is None and "generator down" in out.reason and len(gen.calls) == 3


def test_policy_failure_is_zero_and_image_only_mode_skips_the_text_judge(files):
    gt, refs = files
    with LoopbackServer(route(IMAGE_OK, TEXT_OK)) as server:
        r = rewarder(server, FakeGenerator(1), mode="image", generation_attempts=2)
        zero = r(sample_id="1", question="q", gt_image=str(gt), prediction={"gen_prompt": "", "reference_images": refs})
        img = r(sample_id="1", question="q", gt_image=str(gt), prediction={"gen_prompt": "p", "reference_images": refs[:1]})
        assert server.count == 1
    assert (zero.reward, zero.status) == (0.0, "zero")
    assert img.reward == 0.55 and img.text_reward is None


def test_heuristic_judges_are_labelled_in_every_result(files):
    gt, refs = files
    same = HeuristicImageJudge().judge_image("s", "a blue square", gt, gt)
    assert same.value.visual_correctness == 1.0 and same.value.text_accuracy_na
    assert same.backend == "heuristic" and same.value.rationale.startswith("HEURISTIC")
    other = HeuristicImageJudge().judge_image("s", "p", png_bytes((255, 255, 0)), gt)
    assert other.value.visual_correctness == 0.0
    text = HeuristicTextJudge().judge_text("s", "the Eiffel tower in Paris", gt, "Eiffel tower, Paris, dusk", refs[:1])
    assert text.value.score == 1.0 and text.backend == "heuristic" and "HEURISTIC" in text.value.rationale
    assert HeuristicImageJudge().judge_image("s", "p", b"junk", gt).failure.reason == "unreadable_input"
