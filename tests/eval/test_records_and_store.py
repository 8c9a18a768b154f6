"""Input validation names the culprit; the record store survives torn writes and reruns."""

from __future__ import annotations

import json

import pytest

from gsjax.eval.jsonl import CorruptRecordFile, RecordStore
from gsjax.eval.records import RecordError, load_benchmark, load_judge_inputs, load_judgments
from tests.rewards.fake_servers import png_bytes


def write(path, rows, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return path


def test_benchmark_problems_are_all_reported_naming_each_sample(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "1.png").write_bytes(png_bytes((1, 1, 1)))
    rows = [
        {"id": 1, "prompt": "ok", "meta": {"category": "Biology", "difficulty": "easy"}, "gt_image": "gt/1.png"},
        {"id": 2, "prompt": "p", "meta": {"category": "biology"}, "gt_image": "gt/missing.png"},
        {"id": 1, "prompt": "p", "meta": {"category": "biology"}, "gt_image": "gt/1.png"},
        {"id": 4, "prompt": "p", "meta": {"category": "cooking"}, "gt_image": "gt/1.png"},
        {"id": 5, "prompt": " ", "meta": {"category": "art"}, "gt_image": "gt/1.png"},
    ]
    with pytest.raises(RecordError) as err:
        load_benchmark(write(tmp_path / "bench.json", rows))
    problems = err.value.problems
    assert "sample id=2 (entry #1): ground-truth image missing ('gt/missing.png')" in problems
    assert "sample id=1 (entry #2): duplicated id (first at entry #0)" in problems
    assert "sample id=4 (entry #3): unknown category 'cooking'" in problems
    assert "sample id=5 (entry #4): empty or missing prompt" in problems
    assert len(problems) == 4 and "bench.json: 4 invalid record(s)" in str(err.value)


def test_benchmark_jsonl_with_default_ids_and_relative_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes((1, 1, 1)))
    rows = [{"prompt": "x", "meta": {"category": "art"}, "gt_image": "a.png"},
            {"prompt": "y", "meta": {"category": "news"}, "gt_image": "a.png"}]
    items = load_benchmark(write(tmp_path / "b.jsonl", rows, jsonl=True))
    assert [it.id for it in items] == [0, 1] and items[0].gt_image == tmp_path / "a.png"


def test_judge_input_skip_reasons(tmp_path):
    (tmp_path / "g.png").write_bytes(png_bytes((1, 1, 1)))
    meta = {"category": "art"}
    rows = [
        {"id": 1, "success": True, "prompt": "p", "meta": meta, "output_path": "g.png", "gt_image": "g.png"},
        {"id": 2, "success": False, "prompt": "p", "meta": meta},
        {"id": 3, "success": True, "prompt": "", "meta": meta, "output_path": "g.png", "gt_image": "g.png"},
        {"id": 4, "success": True, "prompt": "p", "meta": meta, "output_path": "no.png", "gt_image": "g.png"},
        {"id": 5, "success": True, "prompt": "p", "meta": meta, "output_path": "g.png", "gt_image": "no.png"},
        {"id": 6, "pending": True},
        {"summary_type": "overall_avg", "avg_scores": {}, "count": 0},
    ]
    inputs = load_judge_inputs(write(tmp_path / "in.json", rows))
    assert [e.skip_reason() for e in inputs] == [None, "not_evaluated", "empty_prompt", "missing_generated_image",
                                                  "missing_gt_image", "not_evaluated"]
    with pytest.raises(RecordError, match=r"sample id=1 \(entry #1\): duplicated id"):
        load_judge_inputs(write(tmp_path / "dup.json", [rows[0], rows[0]]))


def test_judgments_add_unjudged_benchmark_samples_as_failures(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes((1, 1, 1)))
    bench = load_benchmark(write(tmp_path / "b.json", [
        {"id": i, "prompt": "p", "meta": {"category": "art"}, "gt_image": "a.png"} for i in range(3)]))
    judged = [{"id": 0, "meta": {"category": "art"}, "eval_success": True,
               "scores": {"faithfulness": 1, "visual_correctness": 1, "text_accuracy": 1, "aesthetics": 1}},
              {"id": "1", "meta": {"category": "art"}, "eval_success": False, "scores": None, "error": "missing_gt_image"}]
    samples = load_judgments(write(tmp_path / "j.jsonl", judged, jsonl=True), expected=bench)
    assert [(s.id, s.error) for s in samples] == [("0", None), ("1", "missing_gt_image"), ("2", "not_evaluated")]


def test_store_repairs_a_torn_tail_and_keeps_one_record_per_id(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": 1, "v": "a"}\n{"id": 2, "v": "b"}\n{"id": 1, "v": "c"}\n{"id": 3, "v"')
    store = RecordStore(path)
    assert {k: store.get(k)["v"] for k in ("1", "2")} == {"1": "c", "2": "b"} and 3 not in store
    assert path.read_text() == '{"id": 1, "v": "c"}\n{"id": 2, "v": "b"}\n'
    store.put({"id": 2, "v": "d"})
    store.put({"id": 3, "v": "e"})
    store.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"id": 1, "v": "c"}, {"id": 2, "v": "d"}, {"id": 3, "v": "e"}]


def test_store_refuses_a_file_corrupted_in_the_middle(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": 1}\nGARBAGE\n{"id": 2}\n')
    with pytest.raises(CorruptRecordFile, match=r"s.jsonl:2"):
        RecordStore(path)
