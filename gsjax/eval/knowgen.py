"""KnowGen evaluation stages: run (agent) -> generate (image generator) -> judge -> score -> compare.

Each stage reads the previous stage's file, writes one record per sample through a
`RecordStore` (kill-safe, resumable) and, when done, an ordered JSON file in the format the
next stage and upstream's tools read (spec training_and_eval.md §6, §7). The agent and the
generator come in through narrow protocols so tests and other systems can stand in for them.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from gsjax.eval.jsonl import RecordStore, StageProgress, record_key, run_resumable, write_json
from gsjax.eval.kscore import GROUPS, kscore_report
from gsjax.eval.records import (
    BenchmarkItem,
    JudgeInput,
    judged_sample,
    load_judgments,
    read_records,
    resolve_path,
)
from gsjax.eval.report import write_comparison, write_report
from gsjax.imagegen.client import ImageServerClient
from gsjax.rewards.dual import ImageGenerator, generate_with_retries
from gsjax.rewards.image_judge import ImageJudgeBackend
from gsjax.fileio import atomic_write_bytes

MESSAGE_CONTENT_MAX = 50_000
MESSAGE_IMAGES_MAX = 10
IMAGE_PATH_MAX = 200
REFERENCE_FIELDS = ("img_id", "note", "local_path", "url", "title")


# ---------------------------------------------------------------- run


@dataclass(frozen=True)
class EpisodeOutcome:
    """What one agent episode hands back; `reference_images[].local_path` are files it downloaded."""

    termination: str
    gen_prompt: str = ""
    reference_images: Sequence[Mapping] = ()
    messages: Sequence[Mapping] = ()
    error: str | None = None


class EpisodeRunner(Protocol):
    """The agent, seen from the evaluation: one benchmark task in, one outcome out."""

    def __call__(self, task: BenchmarkItem) -> EpisodeOutcome:
        """Run one search episode for `task` (no generation, no scoring)."""


def trim_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Trajectory as stored: content cut to 50000 chars, at most 10 image paths of 200 chars."""
    trimmed = []
    for message in messages:
        entry = {"role": message.get("role"), "content": str(message.get("content") or "")[:MESSAGE_CONTENT_MAX]}
        images = message.get("images") or []
        if images:
            entry["images"] = [str(p)[:IMAGE_PATH_MAX] for p in images[:MESSAGE_IMAGES_MAX]]
        trimmed.append(entry)
    return trimmed


def copy_references(sample_key: str, refs: Sequence[Mapping], ref_dir: Path) -> list[dict]:
    """Copy each reference file to `<ref_dir>/<id>_<img_id><ext>` and point `local_path` at it."""
    copied = []
    for index, ref in enumerate(refs):
        entry = {k: ref.get(k) for k in REFERENCE_FIELDS}
        src = Path(str(ref.get("local_path") or ""))
        if ref.get("local_path") and src.is_file():
            img_id = str(ref.get("img_id") or f"ref{index}")
            dst = ref_dir / f"{sample_key}_{img_id}{src.suffix or '.jpg'}"
            atomic_write_bytes(dst, src.read_bytes())
            entry["local_path"] = str(dst.resolve())
        else:
            entry["local_path"] = None
        copied.append(entry)
    return copied


def run_stage(
    items: Sequence[BenchmarkItem],
    out_dir: Path,
    runner: EpisodeRunner,
    *,
    workers: int = 5,
    progress: StageProgress | None = None,
) -> Path:
    """The agentic run (§7.2) -> `<out>/results.json`. Failed episodes are retried on rerun."""
    out_dir = Path(out_dir)
    ref_dir = out_dir / "ref_images"

    def work(item: BenchmarkItem) -> dict:
        record = {"id": item.id, "prompt": item.prompt, "meta": item.meta,
                  "gt_image": str(item.gt_image) if item.gt_image else None}
        try:
            outcome = runner(item)
        except Exception as exc:  # the agent failed on this sample: record it, go on
            return {**record, "termination": "error", "error": f"{type(exc).__name__}: {exc}",
                    "gen_prompt": "", "reference_images": [], "trajectory_messages": []}
        record.update(
            termination=outcome.termination,
            gen_prompt=outcome.gen_prompt,
            reference_images=copy_references(item.key, outcome.reference_images, ref_dir),
            trajectory_messages=trim_messages(outcome.messages),
        )
        if outcome.error:
            record["error"] = outcome.error
        return record

    with RecordStore(out_dir / "run.jsonl") as store:
        run_resumable(items, store, item_key=lambda it: it.key, is_done=lambda r: not r.get("error"),
                      work=work, workers=workers, progress=progress)
        rows = [store.get(it.key) for it in items if it.key in store]
    write_json(out_dir / "results.json", rows)
    return out_dir / "results.json"


# ---------------------------------------------------------------- generate


HttpImageGenerator = ImageServerClient
"""The image-server client (agent.md §6.1): `HttpImageGenerator(url).generate(prompt, refs)`; the name is
kept for the eval CLI. Other backends: `gsjax.imagegen.client.make_image_generator`."""


def choose_generation_input(row: Mapping, base_dir: Path, max_images: int, direct: bool) -> tuple[str, list[Path]]:
    """gen_prompt with existing refs when there are any, else the original prompt alone (§7.3)."""
    gen_prompt = str(row.get("gen_prompt") or "").strip()
    refs = [resolve_path(r.get("local_path"), base_dir) for r in row.get("reference_images") or [] if isinstance(r, Mapping)]
    existing = [p for p in refs if p is not None and p.is_file()]
    if direct or not gen_prompt or not existing:
        return str(row.get("prompt") or ""), []
    return gen_prompt, existing[:max_images]


def save_png(data: bytes, path: Path) -> None:
    """Decode (which validates the bytes) and write a PNG atomically."""
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def generate_stage(
    rows: Sequence[dict],
    base_dir: Path,
    out_dir: Path,
    generator: ImageGenerator,
    *,
    max_images: int = 3,
    direct: bool = False,
    attempts: int = 3,
    backoff_base_s: float = 1.0,
    workers: int = 1,
    progress: StageProgress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Images for run results (or benchmark rows) -> `<out>/images/<id>.png` + `<out>/results.json`."""
    out_dir = Path(out_dir)

    def work(row: dict) -> dict:
        used_prompt, used_images = choose_generation_input(row, base_dir, max_images, direct)
        gt = resolve_path(row.get("gt_image"), base_dir)
        record = {"id": row["id"], "prompt": row.get("prompt"), "gen_prompt": row.get("gen_prompt"),
                  "meta": row.get("meta") or {}, "gt_image": str(gt.resolve()) if gt else None,
                  "used_prompt": used_prompt, "used_images": [str(p) for p in used_images]}
        output = (out_dir / "images" / f"{record_key(row['id'])}.png").resolve()
        image, error = generate_with_retries(generator, used_prompt, [p.read_bytes() for p in used_images],
                                             attempts=attempts, backoff_base_s=backoff_base_s, backoff_cap_s=10.0,
                                             sleep=sleep, rng=random.Random(0))
        if image is not None:
            try:
                save_png(image, output)
            except (OSError, ValueError) as exc:
                image, error = None, f"unusable image bytes: {exc}"
        if image is None:
            return {**record, "output_path": None, "success": False, "error": error}
        return {**record, "output_path": str(output), "success": True}

    def done(record: dict) -> bool:
        return record.get("success") is True and Path(str(record.get("output_path"))).is_file()

    with RecordStore(out_dir / "generate.jsonl") as store:
        run_resumable(rows, store, item_key=lambda r: r["id"], is_done=done, work=work,
                      workers=workers, progress=progress)
        ordered = [store.get(r["id"]) or {"id": r["id"], "pending": True} for r in rows]
    write_json(out_dir / "results.json", ordered)
    return out_dir / "results.json"


# ---------------------------------------------------------------- judge


def judge_record(entry: JudgeInput, judge: ImageJudgeBackend) -> dict:
    """One §6.2 output row: the input entry + eval_success, scores, error, judge provenance."""
    reason = entry.skip_reason()
    if reason is not None:
        return {**entry.row, "eval_success": False, "scores": None, "error": reason}
    result = judge.judge_image(entry.key, str(entry.row["prompt"]), entry.output_path, entry.gt_image)
    if not result.ok:
        return {**entry.row, "eval_success": False, "scores": None, "error": f"judge_failed: {result.failure.describe()}",
                "judge": result.provenance()}
    return {**entry.row, "eval_success": True, "scores": result.value.as_record(), "error": None,
            "judge": result.provenance()}


def upstream_summaries(report: Mapping) -> list[dict]:
    """The summary objects upstream appends to results_eval.json (failures excluded)."""
    upstream = report["upstream"]
    rows = [(g, upstream["groups"][g]) for g in GROUPS] + [("overall_avg", upstream["overall_avg"])]
    return [{"summary_type": name, "avg_scores": {k: v for k, v in s.items() if k != "count"}, "count": s["count"]}
            for name, s in rows]


def judge_stage(
    inputs: Sequence[JudgeInput],
    out_path: Path,
    judge: ImageJudgeBackend,
    *,
    workers: int = 8,
    progress: StageProgress | None = None,
) -> Path:
    """Judge every generated image -> `out_path` (JSONL) and `results_eval.json` beside it."""
    out_path = Path(out_path)
    with RecordStore(out_path) as store:
        run_resumable(inputs, store, item_key=lambda e: e.key,
                      is_done=lambda r: r.get("eval_success") is True and isinstance(r.get("scores"), dict),
                      work=lambda e: judge_record(e, judge), workers=workers, progress=progress)
        ordered = [store.get(e.key) for e in inputs]
    report = kscore_report([judged_sample(r) for r in ordered])
    write_json(out_path.with_name("results_eval.json"), ordered + upstream_summaries(report))
    return out_path


# ---------------------------------------------------------------- score / compare


def score_stage(
    judgments_path: Path, out_dir: Path, *, expected: Sequence[BenchmarkItem] = (), title: str = "KnowGen"
) -> dict:
    """K-Score of any system's judgements -> score.json, report.md, categories.png in `out_dir`."""
    report = kscore_report(load_judgments(judgments_path, expected=expected))
    report["source"] = str(judgments_path)
    write_report(report, Path(out_dir), title=title)
    return report


def compare_stage(runs: Mapping[str, Path], out_dir: Path) -> dict:
    """Several runs' score.json side by side -> compare.json, compare.md, compare.png."""
    reports = {name: json.loads(Path(path).read_text(encoding="utf-8")) for name, path in runs.items()}
    return write_comparison(reports, Path(out_dir))


def read_stage_rows(path: Path) -> list[dict]:
    """Rows of a previous stage's JSON (pending placeholders dropped)."""
    return [r for r in read_records(path) if not r.get("pending")]


__all__ = [
    "EpisodeOutcome",
    "EpisodeRunner",
    "HttpImageGenerator",
    "compare_stage",
    "generate_stage",
    "judge_stage",
    "run_stage",
    "score_stage",
]
