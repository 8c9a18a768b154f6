"""WISE (PKU-YuanGroup/WISE): 1000 world-knowledge prompts in six subsets, judged on
consistency, realism and aesthetic quality (0-2 each); WiScore = (0.7 C + 0.2 R + 0.1 A) / 2.

Spec training_and_eval.md §6.5. The benchmark's own JSON files are read from a local path.
Where WISE's scripts store a failed judgement as 999 and refuse the file, gsjax records the
failure and reports both a strict score (failure = 0) and one over judged images only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gsjax.errors import InputFileNotFound
from gsjax.eval.jsonl import RecordStore, StageProgress, run_resumable, write_json
from gsjax.eval.records import BenchmarkItem, RecordError, read_records, sample_label
from gsjax.eval.report import bar_chart
from gsjax.fileio import atomic_write_text
from gsjax.rewards.judge_client import ImageSource, InvalidJudgeOutput, JudgeClient, JudgeRequest, JudgeResult

# prompt_id ranges of the six subsets (WISE's scoring scripts); sizes 400/167/133/100/100/100.
SUBSETS: tuple[tuple[str, int, int], ...] = (
    ("cultural", 1, 400), ("time", 401, 567), ("space", 568, 700),
    ("biology", 701, 800), ("physics", 801, 900), ("chemistry", 901, 1000),
)
PAPER_WEIGHTS = {"cultural": 0.4, "time": 0.167, "space": 0.133, "biology": 0.1, "physics": 0.1, "chemistry": 0.1}
DATA_FILES = ("cultural_common_sense.json", "spatio-temporal_reasoning.json", "natural_science.json")
RUBRIC_VERSION = "gsjax-wise-v1"
WISE_DIMENSIONS = ("consistency", "realism", "aesthetic_quality")

SYSTEM_PROMPT = """You are a strict auditor of text-to-image results on prompts that require world knowledge (culture, time, space, biology, physics, chemistry). You receive the PROMPT, an EXPLANATION of what a correct image must show, and one generated image.

Score three dimensions, each an integer 0, 1 or 2. A 2 is exceedingly rare; when in doubt, choose the lower score.
- consistency: how accurately and completely the image realises the prompt as the explanation interprets it. 0: key elements missing or contradicted; 1: partly captured, noticeable deviations; 2: every element and nuance is right, with no ambiguity.
- realism: 0: physically implausible, clearly artificial; 1: believable but with noticeable flaws; 2: indistinguishable from a real photograph, physically coherent.
- aesthetic_quality: 0: poor composition, unappealing; 1: acceptable composition and colour, no distinction; 2: exceptional, masterpiece-level artistry.

Answer with ONE JSON object and nothing else, rationale first:
{"rationale": "two to four sentences", "consistency": 1, "realism": 1, "aesthetic_quality": 0}"""


def subset_of(prompt_id: int) -> str | None:
    return next((name for name, lo, hi in SUBSETS if lo <= prompt_id <= hi), None)


def wiscore(consistency: float, realism: float, aesthetic_quality: float) -> float:
    """(0.7 C + 0.2 R + 0.1 A) / 2, in [0, 1] for scores in 0..2."""
    return (0.7 * consistency + 0.2 * realism + 0.1 * aesthetic_quality) / 2


@dataclass(frozen=True)
class WiseItem:
    prompt_id: int
    prompt: str
    explanation: str
    subcategory: str
    subset: str

    def as_benchmark_item(self) -> BenchmarkItem:
        """The same item for the shared run/generate stages (no ground-truth image in WISE)."""
        return BenchmarkItem(self.prompt_id, self.prompt, {"category": self.subset, "subcategory": self.subcategory})


def _wise_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for folder in (path, path / "data"):
        found = [folder / name for name in DATA_FILES if (folder / name).is_file()]
        if found:
            return found
    raise InputFileNotFound(f"{path}: none of {', '.join(DATA_FILES)} found (looked in it and in its data/)")


def load_wise(path: Path | str) -> list[WiseItem]:
    """WISE's own JSON files (`prompt_id`, `Prompt`, `Explanation`, `Subcategory`), validated."""
    items: list[WiseItem] = []
    problems: list[str] = []
    seen: dict[int, str] = {}
    for file in _wise_files(Path(path)):
        for index, row in enumerate(read_records(file)):
            where = f"{file.name}: {sample_label({'id': row.get('prompt_id')}, index)}"
            pid, prompt = row.get("prompt_id"), row.get("Prompt")
            if not isinstance(pid, int) or subset_of(pid) is None:
                problems.append(f"{where}: prompt_id must be an integer in 1..1000")
                continue
            if not isinstance(prompt, str) or not prompt.strip():
                problems.append(f"{where}: empty or missing Prompt")
            if pid in seen:
                problems.append(f"{where}: duplicated prompt_id (also in {seen[pid]})")
            seen[pid] = file.name
            items.append(WiseItem(pid, str(prompt or ""), str(row.get("Explanation") or ""),
                                  str(row.get("Subcategory") or ""), subset_of(pid)))
    if problems:
        raise RecordError(path, problems)
    return sorted(items, key=lambda it: it.prompt_id)


@dataclass(frozen=True)
class WiseScores:
    consistency: int
    realism: int
    aesthetic_quality: int
    wiscore: float
    rationale: str


def parse_wise_scores(obj: Mapping) -> WiseScores:
    """Each dimension must be 0, 1 or 2 (2.0 accepted); anything else is an invalid reply."""
    values = []
    for key in WISE_DIMENSIONS:
        raw = obj.get(key)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw not in (0, 1, 2):
            raise InvalidJudgeOutput(f"{key} must be 0, 1 or 2, got {raw!r}")
        values.append(int(raw))
    rationale = obj.get("rationale")
    return WiseScores(*values, wiscore(*values), rationale if isinstance(rationale, str) else "")


class WiseJudge:
    """The WISE judge over an OpenAI-compatible vision API (WISE pins gpt-4o-2024-05-13)."""

    def __init__(self, client: JudgeClient) -> None:
        self.client = client

    def judge_wise(self, item: WiseItem, image: ImageSource) -> JudgeResult[WiseScores]:
        text = (f"Sample id: {item.prompt_id}\nPROMPT: {item.prompt}\nEXPLANATION: {item.explanation}\n\n"
                "The attached image was generated for this prompt. Return the JSON object.")
        request = JudgeRequest(SYSTEM_PROMPT, text, (image,), RUBRIC_VERSION)
        return self.client.judge(request, parse_wise_scores)


def wise_judge_stage(
    items: Sequence[WiseItem],
    images_dir: Path,
    out_path: Path,
    judge: WiseJudge,
    *,
    workers: int = 8,
    progress: StageProgress | None = None,
) -> Path:
    """Judge `<images_dir>/<prompt_id>.png` for every item -> one JSONL record per prompt_id."""

    def work(item: WiseItem) -> dict:
        image = Path(images_dir) / f"{item.prompt_id}.png"
        record = {"id": item.prompt_id, "subset": item.subset, "subcategory": item.subcategory,
                  "prompt": item.prompt, "image_path": str(image)}
        if not image.is_file():
            return {**record, "eval_success": False, "scores": None, "error": "missing_generated_image"}
        result = judge.judge_wise(item, image)
        if not result.ok:
            return {**record, "eval_success": False, "scores": None,
                    "error": f"judge_failed: {result.failure.describe()}", "judge": result.provenance()}
        return {**record, "eval_success": True, "scores": asdict(result.value), "error": None,
                "judge": result.provenance()}

    with RecordStore(out_path) as store:
        run_resumable(items, store, item_key=lambda it: it.prompt_id,
                      is_done=lambda r: r.get("eval_success") is True, work=work, workers=workers, progress=progress)
    return Path(out_path)


def _weighted(means: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    total = sum(sizes.values())
    return sum(means[s] * sizes[s] for s in means) / total if total else 0.0


def wise_summary(records: Sequence[Mapping]) -> dict:
    """Per-subset mean WiScore and the overall weighted by subset size, in two conventions:
    strict (a failed sample scores 0) and judged-only (failures left out, WISE's own arithmetic
    when nothing failed). `overall_paper_weights` applies the fixed published weights."""
    per: dict[str, list[float | None]] = {}
    for r in records:
        scores = r.get("scores") if r.get("eval_success") else None
        per.setdefault(str(r["subset"]), []).append(float(scores["wiscore"]) if isinstance(scores, Mapping) else None)
    order = [name for name, _, _ in SUBSETS if name in per]
    strict = {s: sum(v or 0.0 for v in per[s]) / len(per[s]) for s in order}
    judged_lists = {s: [v for v in per[s] if v is not None] for s in order}
    judged = {s: sum(v) / len(v) for s, v in judged_lists.items() if v}
    sizes = {s: len(per[s]) for s in order}
    summary = {
        "subsets": {s: {"strict": round(strict[s], 4), "judged_only": round(judged[s], 4) if s in judged else None,
                        "count": sizes[s], "failures": sizes[s] - len(judged_lists[s])} for s in order},
        "overall_strict": round(_weighted(strict, sizes), 4),
        "overall_judged_only": round(_weighted(judged, {s: len(judged_lists[s]) for s in judged}), 4),
        "samples": sum(sizes.values()),
        "failures": sum(sizes[s] - len(judged_lists[s]) for s in order),
    }
    if set(order) == set(PAPER_WEIGHTS):
        summary["overall_paper_weights"] = round(sum(PAPER_WEIGHTS[s] * strict[s] for s in order), 4)
    return summary


def write_wise_report(summary: Mapping, out_dir: Path) -> None:
    """score.json, report.md and subsets.png."""
    out_dir = Path(out_dir)
    write_json(out_dir / "score.json", summary)
    rows = "\n".join(f"| {s} | {v['strict']:.4f} | {v['judged_only'] if v['judged_only'] is not None else '-'} | "
                     f"{v['count']} | {v['failures']} |" for s, v in summary["subsets"].items())
    text = (f"# WISE: WiScore\n- **Overall (strict, failures = 0, weighted by subset size): {summary['overall_strict']:.4f}**\n"
            f"- Overall over judged images only: {summary['overall_judged_only']:.4f}\n"
            f"- samples {summary['samples']}, failures {summary['failures']}\n\n"
            "| subset | strict | judged only | count | failures |\n|---|---|---|---|---|\n" + rows + "\n")
    atomic_write_text(out_dir / "report.md", text)
    subsets = summary["subsets"]
    bar_chart(out_dir / "subsets.png", "WISE: WiScore per subset (strict)", list(subsets),
              {"strict": [v["strict"] for v in subsets.values()]}, max_value=1.0)
