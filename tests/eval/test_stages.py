"""KnowGen stages: kill each one part-way, rerun, and check that finished samples are skipped
and every id ends with exactly one record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gsjax.eval.jsonl import RecordStore
from gsjax.eval.knowgen import EpisodeOutcome, HttpImageGenerator, generate_stage, judge_stage, run_stage
from gsjax.eval.records import load_benchmark, load_judge_inputs, read_records
from gsjax.rewards.heuristic import HeuristicImageJudge
from gsjax.rewards.image_judge import ImageJudge
from gsjax.rewards.judge_client import JudgeClient, JudgeConfig
from tests.rewards.fake_servers import LoopbackServer, Reply, chat, chat_json, image_server_reply, png_bytes, user_text

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ["biology", "anime", "history", "film"]


class Killed(BaseException):
    """Stands in for SIGINT/SIGKILL at a chosen point: not an Exception, so no stage catches it."""


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ids(records) -> list[str]:
    return [str(r["id"]) for r in records]


@pytest.fixture()
def bench(tmp_path):
    (tmp_path / "gt").mkdir()
    rows = []
    for i in range(8):
        (tmp_path / "gt" / f"{i}.png").write_bytes(png_bytes((20 * i, 0, 0)))
        rows.append({"id": i, "prompt": f"prompt {i}", "gt_image": f"gt/{i}.png",
                     "meta": {"category": CATEGORIES[i % 4], "difficulty": "easy" if i < 4 else "hard"}})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(rows))
    return path


class FakeRunner:
    def __init__(self, download_dir: Path, kill_after: int | None = None, fail: tuple[str, ...] = ()) -> None:
        self.dir, self.kill_after, self.fail = download_dir, kill_after, fail
        self.calls: list[str] = []

    def __call__(self, task):
        if self.kill_after is not None and len(self.calls) >= self.kill_after:
            raise Killed
        self.calls.append(task.key)
        if task.key in self.fail:
            raise RuntimeError("search backend down")
        self.dir.mkdir(exist_ok=True)
        ref = self.dir / f"dl_{task.key}.jpg"
        ref.write_bytes(png_bytes((0, 30 * int(task.key) % 255, 0)))
        refs = [{"img_id": "IMG_001", "local_path": str(ref), "title": "t", "note": "n", "url": "http://u"}]
        msgs = [{"role": "user", "content": "x" * 60_000, "images": [f"/img/{n}" + "p" * 300 for n in range(12)]}]
        return EpisodeOutcome("answer", f"grounded {task.prompt}", refs, msgs)


def test_run_stage_resumes_after_a_kill_and_retries_failures(bench, tmp_path):
    items, out = load_benchmark(bench), tmp_path / "run"
    first = FakeRunner(tmp_path / "dl", kill_after=3)
    with pytest.raises(Killed):
        run_stage(items, out, first, workers=1)
    assert ids(lines(out / "run.jsonl")) == ["0", "1", "2"]

    second = FakeRunner(tmp_path / "dl", fail=("5",))
    run_stage(items, out, second, workers=2)
    assert sorted(second.calls) == ["3", "4", "5", "6", "7"]
    results = read_records(out / "results.json")
    assert ids(results) == [str(i) for i in range(8)]  # input order
    assert results[5]["termination"] == "error" and "search backend down" in results[5]["error"]

    third = FakeRunner(tmp_path / "dl")
    run_stage(items, out, third, workers=2)
    assert third.calls == ["5"]
    stored = lines(out / "run.jsonl")
    assert sorted(ids(stored)) == [str(i) for i in range(8)] and all("error" not in r for r in stored)
    record = read_records(out / "results.json")[2]
    ref = record["reference_images"][0]
    assert Path(ref["local_path"]) == (out / "ref_images" / "2_IMG_001.jpg").resolve() and Path(ref["local_path"]).is_file()
    msg = record["trajectory_messages"][0]
    assert len(msg["content"]) == 50_000 and len(msg["images"]) == 10 and all(len(p) == 200 for p in msg["images"])


class FakeGenerator:
    def __init__(self, kill_after: int | None = None, fail: tuple[str, ...] = ()) -> None:
        self.kill_after, self.fail = kill_after, fail
        self.calls: list[tuple[str, int]] = []

    def generate(self, prompt, images):
        if self.kill_after is not None and len(self.calls) >= self.kill_after:
            raise Killed
        self.calls.append((prompt, len(images)))
        if any(prompt.endswith(f" {i}") for i in self.fail):
            raise ConnectionError("503 no GPU")
        return png_bytes((0, 0, 200))


def run_results(bench, tmp_path) -> Path:
    return run_stage(load_benchmark(bench), tmp_path / "run", FakeRunner(tmp_path / "dl", fail=("6",)), workers=1)


def test_generate_stage_chooses_inputs_resumes_and_writes_the_judge_input(bench, tmp_path):
    results = run_results(bench, tmp_path)
    rows, out = read_records(results), tmp_path / "gen"
    with pytest.raises(Killed):
        generate_stage(rows, results.parent, out, FakeGenerator(kill_after=4), sleep=lambda s: None)
    assert len(lines(out / "generate.jsonl")) == 4

    gen = FakeGenerator()
    judge_input = generate_stage(rows, results.parent, out, gen, attempts=2, workers=2, sleep=lambda s: None)
    # Samples 0..3 finished before the kill and are skipped; 4..7 are generated once each.
    assert sorted(p for p, _ in gen.calls) == ["grounded prompt 4", "grounded prompt 5", "grounded prompt 7", "prompt 6"]
    ordered = read_records(judge_input)
    assert ids(ordered) == [str(i) for i in range(8)]
    # Sample 6's episode failed -> no gen_prompt, no refs -> the original prompt, text-only.
    assert ordered[6]["used_prompt"] == "prompt 6" and ordered[6]["used_images"] == []
    assert ordered[1]["used_prompt"] == "grounded prompt 1" and len(ordered[1]["used_images"]) == 1
    assert all(Path(r["output_path"]).is_file() for r in ordered)

    failing = FakeGenerator(fail=("2",))
    rows[2]["gen_prompt"] = "grounded prompt 2"
    (out / "images" / "2.png").unlink()  # an output that vanished is regenerated
    generate_stage(rows, results.parent, out, failing, attempts=2, sleep=lambda s: None)
    assert failing.calls == [("grounded prompt 2", 1)] * 2
    record = read_records(judge_input)[2]
    assert record["success"] is False and "503 no GPU" in record["error"] and record["output_path"] is None
    assert sorted(ids(lines(out / "generate.jsonl"))) == [str(i) for i in range(8)]


def test_generate_direct_ignores_the_agent_and_marks_unfinished_rows_pending(bench, tmp_path):
    results = run_results(bench, tmp_path)
    rows = read_records(results)
    with pytest.raises(Killed):
        generate_stage(rows, results.parent, tmp_path / "direct", FakeGenerator(kill_after=2), direct=True)
    # A kill leaves no results.json; the rerun writes it complete.
    gen = FakeGenerator()
    generate_stage(rows, results.parent, tmp_path / "direct", gen, direct=True)
    assert all(n == 0 for _, n in gen.calls) and len(gen.calls) == 6
    partial = generate_stage(rows[:1], results.parent, tmp_path / "half", FakeGenerator(), direct=True)
    assert read_records(partial)[0]["success"] is True


def test_http_generator_speaks_the_image_server_schema(tmp_path):
    ref = tmp_path / "r.jpg"
    ref.write_bytes(png_bytes((5, 5, 5)))
    with LoopbackServer(lambda path, body: image_server_reply(body)) as server:
        image = HttpImageGenerator(server.url).generate("a grounded prompt", [ref.read_bytes()])
        path, body = server.requests[0]
    assert path == "/generate" and image.startswith(b"\x89PNG")
    assert body["prompt"] == "a grounded prompt" and body["image_urls"][0].startswith("data:image/png;base64,")
    assert (body["seed"], body["true_cfg_scale"], body["negative_prompt"], body["num_inference_steps"],
            body["guidance_scale"], body["num_images_per_prompt"]) == (0, 4.0, " ", 40, 1.0, 1)
    failing = lambda path, body: Reply(200, {"success": False, "message": "Inference failed: OOM"})  # noqa: E731
    with LoopbackServer(failing) as server, pytest.raises(RuntimeError, match="Inference failed: OOM"):
        HttpImageGenerator(server.url).generate("p", [])


def judge_input_file(bench, tmp_path) -> Path:
    results = run_results(bench, tmp_path)
    return generate_stage(read_records(results), results.parent, tmp_path / "gen", FakeGenerator(), attempts=1)


GOOD = {"rationale": "Constraints: c", "faithfulness": 1, "visual_correctness": 0.5, "text_accuracy": 1,
        "aesthetics": 0.5, "text_accuracy_na": False}


class KillingJudge:
    """Counts judged samples (thread-safe: list.append) and dies on the samples in `kill_ids`."""

    def __init__(self, inner, kill_ids: tuple[str, ...] = ()) -> None:
        self.inner, self.kill_ids = inner, kill_ids
        self.calls: list[str] = []

    def judge_image(self, sample_id, *args):
        if sample_id in self.kill_ids:
            raise Killed
        self.calls.append(sample_id)
        return self.inner.judge_image(sample_id, *args)


def test_judge_stage_resumes_skips_judged_samples_and_retries_failures(bench, tmp_path):
    judge_in = judge_input_file(bench, tmp_path)
    out = tmp_path / "gen" / "judgments.jsonl"
    broken = {"3"}

    def respond(path, body):
        sample = user_text(body).split("\n", 1)[0].removeprefix("Sample id: ")
        return chat("no json, sorry about that") if sample in broken else chat_json(GOOD)

    with LoopbackServer(respond) as server:
        judge = ImageJudge(JudgeClient(JudgeConfig(base_url=server.base_url, max_attempts=2), sleep=lambda s: None))
        with pytest.raises(Killed):
            judge_stage(load_judge_inputs(judge_in), out, KillingJudge(judge, kill_ids=("4",)), workers=2)
        # Samples queued before the killed one finished and were kept (in-flight work included).
        first = RecordStore(out).records()
        assert {"0", "1", "2", "3"} <= set(ids(first)) and "4" not in ids(first)
        judged = {str(r["id"]) for r in first if r["eval_success"]}

        before = server.count
        judge_stage(load_judge_inputs(judge_in), out, judge, workers=2)
        # Nothing already judged is asked again; broken sample 3 costs both of its attempts.
        assert server.count - before == len({str(i) for i in range(8)} - judged - {"3"}) + 2
        assert RecordStore(out).get(3)["error"].startswith("judge_failed: invalid_json after 2 attempt(s)")

        broken.clear()
        before = server.count
        judge_stage(load_judge_inputs(judge_in), out, judge, workers=2)
        assert server.count - before == 1  # only the failed sample is judged again

    records = lines(out)
    assert sorted(ids(records)) == [str(i) for i in range(8)] and all(r["eval_success"] for r in records)
    evaluated = read_records(out.with_name("results_eval.json"))
    assert ids(evaluated[:8]) == [str(i) for i in range(8)]
    assert [r["summary_type"] for r in evaluated[8:]] == ["science_and_knowledge", "pop_culture_and_news", "overall_avg"]
    # Every sample got S_img = .1 + .2 + .4 + .05 = .75 per the fake judge; groups agree.
    assert evaluated[10]["avg_scores"]["overall"] == 0.75 and evaluated[10]["count"] == 8
    assert evaluated[0]["scores"]["overall"] == 0.75 and evaluated[0]["judge"]["model"] == "gpt-4.1"


def test_failed_judgement_is_recorded_with_reason_not_zero(bench, tmp_path):
    judge_in = judge_input_file(bench, tmp_path)
    out = tmp_path / "j.jsonl"
    with LoopbackServer(lambda p, b: Reply(500, "upstream exploded")) as server:
        judge = ImageJudge(JudgeClient(JudgeConfig(base_url=server.base_url, max_attempts=3), sleep=lambda s: None))
        judge_stage(load_judge_inputs(judge_in)[:2], out, judge, workers=1)
        assert server.count == 6
    for record in lines(out):
        assert record["eval_success"] is False and record["scores"] is None
        assert record["error"].startswith("judge_failed: http_500 after 3 attempt(s)")


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from gsjax.eval.knowgen import judge_stage
from gsjax.eval.records import load_judge_inputs
from gsjax.rewards.heuristic import HeuristicImageJudge

class Slow(HeuristicImageJudge):
    def judge_image(self, *args):
        time.sleep(0.03)
        return super().judge_image(*args)

judge_stage(load_judge_inputs(sys.argv[1]), Path(sys.argv[2]), Slow(), workers=2)
"""


def test_judge_stage_survives_sigkill(tmp_path):
    img = tmp_path / "i.png"
    img.write_bytes(png_bytes((1, 2, 3)))
    n = 200
    rows = [{"id": i, "success": True, "prompt": "p", "meta": {"category": "art"}, "output_path": str(img),
             "gt_image": str(img)} for i in range(n)]
    judge_in, out = tmp_path / "in.json", tmp_path / "out.jsonl"
    judge_in.write_text(json.dumps(rows))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(judge_in), str(out)], cwd=REPO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    finished = len(RecordStore(out))
    assert 5 <= finished < n

    counting = KillingJudge(HeuristicImageJudge())
    judge_stage(load_judge_inputs(judge_in), out, counting, workers=2)
    assert len(counting.calls) == n - finished
    records = lines(out)
    assert sorted(int(r["id"]) for r in records) == list(range(n))
    assert all(r["judge"]["backend"] == "heuristic" and r["scores"]["rationale"].startswith("HEURISTIC") for r in records)
