"""Human-readable output of a score: JSON, a markdown report and a PNG bar chart per category,
and the side-by-side comparison of several runs.

Charts are drawn with Pillow (already a dependency) rather than matplotlib: a horizontal bar
chart needs nothing more, and `score` must work on a bare install.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from gsjax.eval.jsonl import write_json
from gsjax.eval.kscore import DIMENSIONS, GROUPS
from gsjax.fileio import atomic_write_text

PALETTE = ((52, 101, 164), (204, 102, 0), (78, 154, 6), (117, 80, 123), (164, 0, 0), (32, 74, 135))
_ROW_H, _BAR_H, _LABEL_W, _PLOT_W, _MARGIN = 8, 14, 230, 560, 16


def bar_chart(path: Path, title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]], max_value: float = 100.0) -> None:
    """Horizontal grouped bars: one band per label, one bar per series, value printed at the end."""
    font = ImageFont.load_default()
    n = max(1, len(series))
    band = n * _BAR_H + _ROW_H
    legend_h = 18 * n
    height = _MARGIN * 3 + 20 + legend_h + band * max(1, len(labels))
    width = _LABEL_W + _PLOT_W + 80
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((_MARGIN, _MARGIN), title, fill="black", font=font)
    for i, name in enumerate(series):
        y = _MARGIN + 20 + 18 * i
        draw.rectangle((_MARGIN, y, _MARGIN + 12, y + 10), fill=PALETTE[i % len(PALETTE)])
        draw.text((_MARGIN + 18, y), name, fill="black", font=font)
    top = _MARGIN * 2 + 20 + legend_h
    draw.line((_LABEL_W, top, _LABEL_W, height - _MARGIN), fill="gray")
    for row, label in enumerate(labels):
        y0 = top + row * band
        draw.text((_MARGIN, y0 + (band - _ROW_H) // 2 - 5), label[:36], fill="black", font=font)
        for i, values in enumerate(series.values()):
            value = float(values[row])
            y = y0 + i * _BAR_H
            length = int(_PLOT_W * max(0.0, min(value, max_value)) / max_value)
            draw.rectangle((_LABEL_W, y, _LABEL_W + length, y + _BAR_H - 3), fill=PALETTE[i % len(PALETTE)])
            draw.text((_LABEL_W + length + 4, y), f"{value:.2f}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _dimension_rows(named: Mapping[str, Mapping]) -> list[list[object]]:
    return [[name, *(s[d] for d in DIMENSIONS), s["overall"], s["count"]] for name, s in named.items()]


def render_markdown(report: Mapping, title: str) -> str:
    """The report: headline K-Scores, group and category tables, difficulties, failures."""
    header = ["", *DIMENSIONS, "overall", "count"]
    parts = [
        f"# {title}: K-Score",
        f"- **K-Score (strict, every sample counts, failures = 0): {report['kscore_strict']:.2f}**",
        f"- K-Score (upstream convention, failures excluded): {report['kscore_upstream']:.2f}",
        f"- samples: {report['samples']}, failures: {report['failures']['count']} {report['failures']['by_reason']}, "
        f"unknown category: {report['unknown_category']['count']}, judged by: {report.get('judge_backends') or 'unknown'}",
    ]
    if "heuristic" in (report.get("judge_backends") or {}):
        parts.insert(1, "\n> **HEURISTIC scores**: some samples were scored by the offline heuristic backend "
                        "(image statistics), not by a judge model. Not comparable to published K-Scores.\n")
    for convention in ("strict", "upstream"):
        c = report[convention]
        parts += [f"\n## Groups ({convention})", _table(header, _dimension_rows({**c["groups"], "overall_avg": c["overall_avg"]}))]
    cats = report["per_category"]
    parts += ["\n## Per category (overall x 100)", _table(
        ["category", "group", "strict", "upstream", "count (strict)"],
        [[cat, next(g for g, cs in GROUPS.items() if cat in cs), _pct(v["strict"]["overall"]),
          _pct(v["upstream"]["overall"]), v["strict"]["count"]] for cat, v in cats.items()],
    )]
    parts += ["\n## Per difficulty (K-Score)", _table(
        ["difficulty", "strict", "upstream", "count (strict)"],
        [[d, f"{v['strict']['kscore']:.2f}", f"{v['upstream']['kscore']:.2f}", v["strict"]["overall_avg"]["count"]]
         for d, v in report["per_difficulty"].items()],
    )]
    if report["failures"]["ids"]:
        parts += ["\n## Failed samples", ", ".join(map(str, report["failures"]["ids"][:200]))]
    if report["unknown_category"]["ids"]:
        parts += ["\n## Samples with an unknown category (excluded)", ", ".join(map(str, report["unknown_category"]["ids"][:200]))]
    return "\n".join(parts) + "\n"


def write_report(report: Mapping, out_dir: Path, *, title: str = "KnowGen") -> None:
    """score.json, report.md and categories.png in `out_dir`."""
    write_json(out_dir / "score.json", report)
    atomic_write_text(out_dir / "report.md", render_markdown(report, title))
    cats = report["per_category"]
    bar_chart(out_dir / "categories.png", f"{title}: per-category score x 100", list(cats), {
        "strict": [100 * v["strict"]["overall"] for v in cats.values()],
        "upstream": [100 * v["upstream"]["overall"] for v in cats.values()],
    })


def comparison_table(reports: Mapping[str, Mapping]) -> dict:
    """Headline and per-category numbers of each run (strict convention for categories)."""
    categories = sorted({c for r in reports.values() for c in r["per_category"]})
    return {
        "runs": {
            name: {
                "kscore_strict": r["kscore_strict"],
                "kscore_upstream": r["kscore_upstream"],
                "groups_strict": {g: round(100 * r["strict"]["groups"][g]["overall"], 2) for g in GROUPS},
                "failures": r["failures"]["count"],
                "per_category_strict": {
                    c: round(100 * r["per_category"][c]["strict"]["overall"], 2) if c in r["per_category"] else None
                    for c in categories
                },
            }
            for name, r in reports.items()
        },
        "categories": categories,
    }


def write_comparison(reports: Mapping[str, Mapping], out_dir: Path) -> dict:
    """compare.json, compare.md and compare.png for runs given as {name: score.json content}."""
    table = comparison_table(reports)
    runs = table["runs"]
    names = list(runs)
    head = _table(
        ["run", "K-Score strict", "K-Score upstream", *GROUPS, "failures"],
        [[n, runs[n]["kscore_strict"], runs[n]["kscore_upstream"], *runs[n]["groups_strict"].values(), runs[n]["failures"]]
         for n in names],
    )
    per_cat = _table(
        ["category", *names],
        [[c, *("-" if runs[n]["per_category_strict"][c] is None else runs[n]["per_category_strict"][c] for n in names)]
         for c in table["categories"]],
    )
    write_json(out_dir / "compare.json", table)
    atomic_write_text(out_dir / "compare.md", f"# Comparison\n\n{head}\n\n## Per category (strict, x 100)\n{per_cat}\n")
    bar_chart(out_dir / "compare.png", "Per-category score x 100 (strict)", ["K-Score", *table["categories"]], {
        n: [runs[n]["kscore_strict"], *(runs[n]["per_category_strict"][c] or 0.0 for c in table["categories"])]
        for n in names
    })
    return table
