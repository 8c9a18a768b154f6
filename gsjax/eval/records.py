"""Record formats of the evaluation stages and their validation.

Benchmark input (spec training_and_eval.md §5.3), judge input (§6.1) and judgement records
(§6.2). Validation collects every problem and names the sample (id and position) in one
error, so a broken benchmark file is fixed in one pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gsjax.errors import InputError
from gsjax.eval.jsonl import record_key
from gsjax.eval.kscore import CATEGORY_GROUP, JudgedSample
from gsjax.fileio import read_json_records

KNOWGEN_CATEGORIES = frozenset(CATEGORY_GROUP)
_SHOWN_PROBLEMS = 20


class RecordError(InputError, ValueError):
    """Invalid input records; `problems` name each offending sample."""

    def __init__(self, source: Path | str, problems: Sequence[str]) -> None:
        self.source = str(source)
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:_SHOWN_PROBLEMS])
        more = len(self.problems) - _SHOWN_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{self.source}: {len(self.problems)} invalid record(s):\n{shown}{tail}")


def read_records(path: Path | str) -> list[dict]:
    """A JSON array or JSONL file of objects."""
    rows = read_json_records(path)
    bad = [f"entry #{i}: not a JSON object" for i, row in enumerate(rows) if not isinstance(row, dict)]
    if bad:
        raise RecordError(path, bad)
    return rows


def resolve_path(value: object, base_dir: Path) -> Path | None:
    """Relative paths resolve against the directory of the file that names them (§6.1)."""
    if not value:
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base_dir / path


def sample_label(row: Mapping, index: int) -> str:
    return f"sample id={row.get('id', index)!r} (entry #{index})"


def _meta(row: Mapping) -> dict:
    meta = row.get("meta")
    return dict(meta) if isinstance(meta, Mapping) else {}


def _common_problems(rows: Sequence[Mapping], categories: Collection[str] | None) -> list[str]:
    """Duplicated ids and unknown categories, each naming the sample."""
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        key = record_key(row.get("id", index))
        if key in first_seen:
            problems.append(f"{sample_label(row, index)}: duplicated id (first at entry #{first_seen[key]})")
        else:
            first_seen[key] = index
        category = _meta(row).get("category")
        if categories is not None and str(category or "").lower() not in categories:
            problems.append(f"{sample_label(row, index)}: unknown category {category!r}")
    return problems


@dataclass(frozen=True)
class BenchmarkItem:
    """A task for the agentic run: `id` as given (index when absent), meta passed through."""

    id: object
    prompt: str
    meta: dict = field(default_factory=dict)
    gt_image: Path | None = None

    @property
    def key(self) -> str:
        return record_key(self.id)


def parse_benchmark(
    rows: Sequence[Mapping],
    *,
    source: Path | str,
    base_dir: Path,
    categories: Collection[str] | None = KNOWGEN_CATEGORIES,
    require_gt: bool = True,
) -> list[BenchmarkItem]:
    """Validate benchmark rows: a prompt, a unique id, a known category, an existing GT image."""
    problems = _common_problems(rows, categories)
    items: list[BenchmarkItem] = []
    for index, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{sample_label(row, index)}: empty or missing prompt")
        gt = resolve_path(row.get("gt_image"), base_dir)
        if require_gt and (gt is None or not gt.is_file()):
            problems.append(f"{sample_label(row, index)}: ground-truth image missing ({row.get('gt_image')!r})")
        items.append(BenchmarkItem(row.get("id", index), str(prompt or ""), _meta(row), gt))
    if problems:
        raise RecordError(source, problems)
    return items


def load_benchmark(
    path: Path | str, *, categories: Collection[str] | None = KNOWGEN_CATEGORIES, require_gt: bool = True
) -> list[BenchmarkItem]:
    path = Path(path)
    return parse_benchmark(
        read_records(path), source=path, base_dir=path.parent, categories=categories, require_gt=require_gt
    )


@dataclass(frozen=True)
class JudgeInput:
    """One row of the judge input (§6.1) with paths resolved; `row` is kept verbatim for output."""

    row: dict
    output_path: Path | None
    gt_image: Path | None

    @property
    def key(self) -> str:
        return record_key(self.row["id"])

    def skip_reason(self) -> str | None:
        """Why this entry is not sent to the judge (§6.2 error codes), or None."""
        if self.row.get("pending") or self.row.get("success") is not True:
            return "not_evaluated"
        if not str(self.row.get("prompt") or "").strip():
            return "empty_prompt"
        if self.output_path is None or not self.output_path.is_file():
            return "missing_generated_image"
        if self.gt_image is None or not self.gt_image.is_file():
            return "missing_gt_image"
        return None


def is_summary(row: Mapping) -> bool:
    return "summary_type" in row


def load_judge_inputs(path: Path | str, *, categories: Collection[str] | None = KNOWGEN_CATEGORIES) -> list[JudgeInput]:
    """Judge input rows (summary objects skipped); pending rows need only an id."""
    path = Path(path)
    rows = [r for r in read_records(path) if not is_summary(r)]
    problems = [f"entry #{i}: no id" for i, r in enumerate(rows) if "id" not in r]
    problems += _common_problems([r for r in rows if not r.get("pending")], categories)
    if problems:
        raise RecordError(path, problems)
    return [JudgeInput(r, resolve_path(r.get("output_path"), path.parent), resolve_path(r.get("gt_image"), path.parent))
            for r in rows]


def judged_sample(row: Mapping) -> JudgedSample:
    """A judgement record (§6.2) as K-Score input; anything without dict scores is a failure."""
    meta = _meta(row)
    scores = row.get("scores") if row.get("eval_success") else None
    ok = isinstance(scores, Mapping)
    judge = row.get("judge")
    return JudgedSample(
        id=record_key(row["id"]),
        category=str(meta.get("category") or ""),
        difficulty=meta.get("difficulty"),
        scores=scores if ok else None,
        error=None if ok else str(row.get("error") or "not_evaluated"),
        backend=str(judge.get("backend")) if isinstance(judge, Mapping) and judge.get("backend") else None,
    )


def load_judgments(path: Path | str, *, expected: Sequence[BenchmarkItem] = ()) -> list[JudgedSample]:
    """Judgement records from any system (JSONL or results_eval.json). Benchmark items with no
    judgement are added as `not_evaluated` failures, so the strict score counts them."""
    path = Path(path)
    rows = [r for r in read_records(path) if not is_summary(r)]
    problems = [f"entry #{i}: no id" for i, r in enumerate(rows) if "id" not in r]
    problems += _common_problems(rows, categories=None)
    if problems:
        raise RecordError(path, problems)
    samples = [judged_sample(r) for r in rows]
    seen = {s.id for s in samples}
    for item in expected:
        if item.key not in seen:
            samples.append(JudgedSample(item.key, str(item.meta.get("category") or ""), item.meta.get("difficulty"),
                                        None, "not_evaluated"))
    return samples
