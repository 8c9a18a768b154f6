"""`gsjax eval` end to end through typer: run -> generate -> judge -> score -> compare, WISE,
and scoring judgements produced by another system."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gsjax.eval.cli import eval_app
from tests.eval.test_stages import FakeRunner
from tests.rewards.fake_servers import LoopbackServer, chat_json, image_server_reply, png_bytes

cli = CliRunner()


def make_runner(config: str | None) -> FakeRunner:
    """The `--runner` factory the CLI imports: an agent stand-in that downloads into `config`."""
    return FakeRunner(Path(config))


def invoke(*args: str, env: dict | None = None):
    return cli.invoke(eval_app, [str(a) for a in args], env=env)


def scored(f, v, t, a, category, id_, difficulty="easy"):
    return {"id": id_, "success": True, "prompt": "p", "meta": {"category": category, "difficulty": difficulty},
            "eval_success": True, "error": None,
            "scores": {"faithfulness": f, "visual_correctness": v, "text_accuracy": t, "aesthetics": a,
                       "overall": 0.0, "rationale": "r"}}


def test_score_accepts_judgements_from_another_system(tmp_path):
    rows = [scored(1, 1, 1, 1, "Biology", 1), scored(0, 0.5, 0.5, 0, "anime", 2),
            {"id": 3, "meta": {"category": "anime"}, "eval_success": False, "scores": None, "error": "not_evaluated"},
            scored(1, 1, 1, 1, "cooking", 4),
            {"summary_type": "overall_avg", "avg_scores": {}, "count": 2}]
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps(rows))
    result = invoke("knowgen", "score", "--judgments", path, "--out", tmp_path / "score")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "score" / "score.json").read_text())
    # Upstream: S&K {1} = 1.0; Pop {2} = 0 + .2 + .2 + 0 = .4 -> K = 70.
    # Strict: Pop {2, 3 as zeros} = f 0, v .25, t .25, a 0 -> .1 + .1 = .2 -> K = (1 + .2)/2 = 60.
    assert report["kscore_upstream"] == 70.0 and report["kscore_strict"] == 60.0
    assert "K-Score strict 60.00" in result.output and "unknown category" in result.output and "'4'" in result.output
    assert "**K-Score (strict" in (tmp_path / "score" / "report.md").read_text()
    assert (tmp_path / "score" / "categories.png").read_bytes().startswith(b"\x89PNG")

    other = tmp_path / "other.json"
    other.write_text(json.dumps([scored(0.5, 0.5, 0.5, 0.5, "biology", 1), scored(1, 1, 1, 1, "film", 2)]))
    assert invoke("knowgen", "score", "--judgments", other, "--out", tmp_path / "score2").exit_code == 0
    result = invoke("knowgen", "compare", f"direct={tmp_path / 'score' / 'score.json'}",
                    f"agent={tmp_path / 'score2' / 'score.json'}", "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(table["runs"]) == ["direct", "agent"] and table["runs"]["agent"]["kscore_strict"] == 75.0
    assert "| direct | 60.0" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_invalid_benchmark_is_refused_naming_the_sample(tmp_path):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps([{"id": 17, "prompt": "p", "meta": {"category": "cooking"}, "gt_image": "nope.png"}]))
    result = invoke("knowgen", "run", "--benchmark", bad, "--out", tmp_path / "o", "--runner", "x:y")
    assert result.exit_code == 2
    assert "sample id=17" in result.output and "unknown category 'cooking'" in result.output


def test_full_pipeline_through_the_cli(tmp_path, monkeypatch):
    (tmp_path / "gt").mkdir()
    rows = []
    for i, cat in enumerate(["biology", "anime", "film"]):
        (tmp_path / "gt" / f"{i}.png").write_bytes(png_bytes((0, 0, 60 * i)))
        rows.append({"id": i, "prompt": f"prompt {i}", "meta": {"category": cat, "difficulty": "easy"}, "gt_image": f"gt/{i}.png"})
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(rows))
    run, gen = tmp_path / "run", tmp_path / "gen"

    result = invoke("knowgen", "run", "--benchmark", bench, "--out", run, "--runner", "tests.eval.test_cli:make_runner",
                    "--runner-config", tmp_path / "downloads", "--workers", "2")
    assert result.exit_code == 0, result.output
    with LoopbackServer(lambda path, body: image_server_reply(body)) as images:
        result = invoke("knowgen", "generate", "--results", run / "results.json", "--out", gen,
                        "--generator-url", images.url)
        assert result.exit_code == 0, result.output
        assert [len(body["image_urls"]) for _, body in images.requests] == [1, 1, 1]
    reply = chat_json({"rationale": "Constraints: c", "faithfulness": 1, "visual_correctness": 1, "text_accuracy": 0,
                       "aesthetics": 1, "text_accuracy_na": True})  # S_img = .1 + .4 + .2 + .1 = .8
    with LoopbackServer(lambda path, body: reply) as judge:
        args = ["knowgen", "judge", "--input", gen / "results.json", "--judge-base-url", judge.base_url,
                "--judge-cache", tmp_path / "cache", "--workers", "2"]
        result = invoke(*args, env={"GEN_REWARD_API_KEY": "sk-test"})
        assert result.exit_code == 0, result.output
        assert judge.count == 3
        # Re-judging from scratch costs nothing: every reply comes from the cache.
        (gen / "judgments.jsonl").unlink()
        assert invoke(*args, env={"GEN_REWARD_API_KEY": "sk-test"}).exit_code == 0
        assert judge.count == 3
    result = invoke("knowgen", "score", "--judgments", gen / "judgments.jsonl", "--benchmark", bench, "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s" / "score.json").read_text())
    # Text N/A everywhere -> group text mean 0.5: .1 + .4 + .2 + .1 = .8 in both groups.
    assert report["kscore_strict"] == 80.0 and report["failures"]["count"] == 0


def test_wise_cli_judge_and_score(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "natural_science.json").write_text(json.dumps(
        [{"prompt_id": 701, "Prompt": "a", "Explanation": "e", "Subcategory": "s"},
         {"prompt_id": 801, "Prompt": "b", "Explanation": "e", "Subcategory": "s"}]))
    with LoopbackServer(lambda path, body: image_server_reply(body)) as server:
        result = invoke("wise", "generate", "--data", data, "--out", tmp_path / "gen", "--generator-url", server.url)
        assert result.exit_code == 0, result.output
        assert [body["prompt"] for _, body in server.requests] == ["a", "b"]
    images = tmp_path / "gen" / "images"
    reply = chat_json({"rationale": "r", "consistency": 2, "realism": 2, "aesthetic_quality": 1})
    with LoopbackServer(lambda path, body: reply) as judge:
        result = invoke("wise", "judge", "--data", data, "--images", images, "--out", tmp_path / "w.jsonl",
                        "--judge-base-url", judge.base_url)
        assert result.exit_code == 0, result.output
    result = invoke("wise", "score", "--judgments", tmp_path / "w.jsonl", "--out", tmp_path / "ws")
    assert result.exit_code == 0, result.output
    # (0.7*2 + 0.2*2 + 0.1*1) / 2 = 0.95 for both subsets
    assert json.loads((tmp_path / "ws" / "score.json").read_text())["overall_strict"] == pytest.approx(0.95)


def test_heuristic_judging_is_flagged_in_records_and_report(tmp_path):
    img = tmp_path / "i.png"
    img.write_bytes(png_bytes((9, 9, 9)))
    rows = [{"id": i, "success": True, "prompt": "p", "meta": {"category": "art"}, "output_path": "i.png",
             "gt_image": "i.png"} for i in range(2)]
    (tmp_path / "in.json").write_text(json.dumps(rows))
    assert invoke("knowgen", "judge", "--input", tmp_path / "in.json", "--heuristic").exit_code == 0
    records = [json.loads(line) for line in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert all(r["judge"]["backend"] == "heuristic" and "HEURISTIC" in r["scores"]["rationale"] for r in records)
    assert invoke("knowgen", "score", "--judgments", tmp_path / "judgments.jsonl", "--out", tmp_path / "s").exit_code == 0
    assert json.loads((tmp_path / "s" / "score.json").read_text())["judge_backends"] == {"heuristic": 2}
    assert "**HEURISTIC scores**" in (tmp_path / "s" / "report.md").read_text()


def test_generate_through_an_openai_compatible_images_api(tmp_path):
    from tests.imagegen.fakes import FakeImagesApi
    from tests.imagegen.loopback import LoopbackUvicorn

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"id": i, "prompt": f"prompt {i}", "meta": {"category": "biology"}}
                                 for i in range(2)]))
    fake = FakeImagesApi()
    with LoopbackUvicorn(fake.app()) as server:
        result = invoke("knowgen", "generate", "--results", bench, "--out", tmp_path / "gen", "--direct",
                        "--generator-backend", "openai", "--generator-url", server.url + "/v1",
                        "--generator-model", "gpt-image-1.5", "--generator-api-key-env", "MY_IMAGES_KEY",
                        env={"MY_IMAGES_KEY": "sk-images"})
    assert result.exit_code == 0, result.output
    assert sorted(r["fields"]["prompt"] for r in fake.requests) == ["prompt 0", "prompt 1"]
    assert {r["headers"]["authorization"] for r in fake.requests} == {"Bearer sk-images"}
    rows = json.loads((tmp_path / "gen" / "results.json").read_text())
    assert all(r["success"] for r in rows)
    assert all((tmp_path / "gen" / r["output_path"]).read_bytes() == fake.image for r in rows)


def test_unknown_generator_backend_is_refused(tmp_path):
    result = invoke("knowgen", "generate", "--results", tmp_path / "x.json", "--out", tmp_path / "gen",
                    "--generator-backend", "dalle")
    assert result.exit_code == 2 and "unknown image backend 'dalle'" in result.output
