"""WISE: loading the benchmark's own files, the WiScore formula, subset weighting, judging."""

from __future__ import annotations

import json

import pytest

from gsjax.eval.records import RecordError
from gsjax.eval.wise import (
    WiseJudge,
    load_wise,
    parse_wise_scores,
    wise_judge_stage,
    wise_summary,
    wiscore,
    write_wise_report,
)
from gsjax.rewards.judge_client import InvalidJudgeOutput, JudgeClient, JudgeConfig
from tests.rewards.fake_servers import LoopbackServer, chat_json, png_bytes, scripted


def entry(pid, sub="x"):
    return {"prompt_id": pid, "Prompt": f"prompt {pid}", "Explanation": f"why {pid}", "Subcategory": sub}


@pytest.fixture()
def wise_dir(tmp_path):
    data = tmp_path / "WISE" / "data"
    data.mkdir(parents=True)
    (data / "cultural_common_sense.json").write_text(json.dumps([entry(1, "Festival"), entry(2)]))
    (data / "spatio-temporal_reasoning.json").write_text(json.dumps([entry(401), entry(568)]))
    (data / "natural_science.json").write_text(json.dumps([entry(701), entry(801), entry(901)]))
    return tmp_path / "WISE"


def test_wiscore_formula():
    assert wiscore(2, 2, 2) == pytest.approx(1.0)
    assert wiscore(2, 1, 0) == pytest.approx((0.7 * 2 + 0.2 * 1 + 0.1 * 0) / 2)  # 0.8
    assert wiscore(1, 0, 2) == pytest.approx((0.7 + 0.2) / 2)  # 0.45


def test_load_wise_maps_prompt_ids_to_subsets(wise_dir):
    items = load_wise(wise_dir)
    assert [(it.prompt_id, it.subset) for it in items] == [
        (1, "cultural"), (2, "cultural"), (401, "time"), (568, "space"), (701, "biology"), (801, "physics"),
        (901, "chemistry")]
    assert items[0].subcategory == "Festival" and items[0].as_benchmark_item().meta["category"] == "cultural"


def test_load_wise_names_bad_samples(wise_dir):
    (wise_dir / "data" / "natural_science.json").write_text(json.dumps([entry(1), entry(1001), {"prompt_id": 702}]))
    with pytest.raises(RecordError) as err:
        load_wise(wise_dir)
    assert err.value.problems == [
        "natural_science.json: sample id=1 (entry #0): duplicated prompt_id (also in cultural_common_sense.json)",
        "natural_science.json: sample id=1001 (entry #1): prompt_id must be an integer in 1..1000",
        "natural_science.json: sample id=702 (entry #2): empty or missing Prompt",
    ]


def test_scores_must_be_integers_zero_to_two():
    assert parse_wise_scores({"consistency": 2, "realism": 1.0, "aesthetic_quality": 0}).wiscore == pytest.approx(0.8)
    for bad in ({"consistency": 3, "realism": 1, "aesthetic_quality": 1},
                {"consistency": 1.5, "realism": 1, "aesthetic_quality": 1},
                {"consistency": "2", "realism": 1, "aesthetic_quality": 1},
                {"realism": 1, "aesthetic_quality": 1}):
        with pytest.raises(InvalidJudgeOutput):
            parse_wise_scores(bad)


def rec(subset, score):
    ok = score is not None
    return {"id": 0, "subset": subset, "eval_success": ok, "scores": {"wiscore": score} if ok else None}


def test_summary_weights_subsets_by_size():
    records = [rec("cultural", 0.8), rec("cultural", None), rec("cultural", 0.5), rec("time", 0.2)]
    s = wise_summary(records)
    # cultural strict (0.8 + 0 + 0.5)/3 = 0.4333, judged-only (0.8 + 0.5)/2 = 0.65; time 0.2
    assert s["subsets"]["cultural"] == {"strict": 0.4333, "judged_only": 0.65, "count": 3, "failures": 1}
    # overall strict = (3 * 0.4333.. + 1 * 0.2) / 4 = 1.5 / 4 = 0.375; judged-only (2 * 0.65 + 0.2) / 3 = 0.5
    assert s["overall_strict"] == 0.375 and s["overall_judged_only"] == 0.5
    assert "overall_paper_weights" not in s and s["failures"] == 1


def test_full_benchmark_sizes_reproduce_the_paper_weights():
    sizes = {"cultural": 400, "time": 167, "space": 133, "biology": 100, "physics": 100, "chemistry": 100}
    means = {"cultural": 0.5, "time": 0.25, "space": 1.0, "biology": 0.0, "physics": 0.75, "chemistry": 0.5}
    records = [rec(sub, means[sub]) for sub, n in sizes.items() for _ in range(n)]
    s = wise_summary(records)
    expected = 0.4 * 0.5 + 0.167 * 0.25 + 0.133 * 1.0 + 0.1 * 0.0 + 0.1 * 0.75 + 0.1 * 0.5  # 0.49975
    assert s["overall_strict"] == pytest.approx(round(expected, 4))
    assert s["overall_paper_weights"] == pytest.approx(round(expected, 4))


def test_wise_judge_stage_end_to_end(wise_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for pid in (1, 401, 568, 701, 801, 901):  # prompt 2 has no image
        (images / f"{pid}.png").write_bytes(png_bytes((pid % 255, 0, 0)))
    replies = [chat_json({"rationale": "r", "consistency": 5, "realism": 1, "aesthetic_quality": 1}),
               chat_json({"rationale": "r", "consistency": 2, "realism": 1, "aesthetic_quality": 0})]
    out = tmp_path / "wise.jsonl"
    with LoopbackServer(scripted(replies)) as server:
        judge = WiseJudge(JudgeClient(JudgeConfig(base_url=server.base_url, max_attempts=2), sleep=lambda s: None))
        wise_judge_stage(load_wise(wise_dir), images, out, judge, workers=1)
        assert server.count == 7  # the first reply (consistency 5) is rejected and retried once
        wise_judge_stage(load_wise(wise_dir), images, out, judge, workers=1)
        assert server.count == 7  # rerun: judged samples skipped; prompt 2 still has no image
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7
    missing = next(r for r in records if r["id"] == 2)
    assert missing["eval_success"] is False and missing["error"] == "missing_generated_image"
    s = wise_summary(records)
    # Every judged image scored (2, 1, 0) -> 0.8; cultural has one missing image -> strict 0.4
    assert s["subsets"]["cultural"]["strict"] == 0.4 and s["subsets"]["time"]["strict"] == 0.8
    assert s["overall_paper_weights"] == pytest.approx(0.4 * 0.4 + (0.167 + 0.133 + 0.1 + 0.1 + 0.1) * 0.8)  # 0.64
    write_wise_report(s, tmp_path / "report")
    assert (tmp_path / "report" / "subsets.png").read_bytes().startswith(b"\x89PNG")
    assert "Overall (strict" in (tmp_path / "report" / "report.md").read_text()
