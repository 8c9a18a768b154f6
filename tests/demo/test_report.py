"""The report: markdown with the stage table, the HEURISTIC label, a two-panel PNG of the curves, and the
example trajectory with its images copied next to the report."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from gsjax.demo.report import Example, ReportData, StageRow, write_report


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_report_has_curves_stages_and_the_example_with_its_images(tmp_path: Path) -> None:
    search_img = _png(tmp_path / "episode" / "images" / "abc.jpg", (200, 10, 10))
    generated = _png(tmp_path / "generated" / "gen.png", (10, 10, 200))
    example = Example(
        title="GRPO rollout t:0",
        messages=[{"role": "system", "text": "the system prompt", "images": []},
                  {"role": "user", "text": "Draw the Eiffel Tower.", "images": []},
                  {"role": "assistant", "text": '<tool_call>\n{"name": "image_search"}\n</tool_call>', "images": []},
                  {"role": "user", "text": "<tool_response>\nIMG_001: title: x\n</tool_response>",
                   "images": [str(search_img)]}],
        prediction={"gen_prompt": "the tower, as in the only reference image",
                    "reference_images": [{"img_id": "IMG_001", "note": "shape", "local_path": str(search_img)}]},
        termination="answer", reward={"reward": 0.42, "status": "scored"}, generated_image=generated)
    data = ReportData(workdir=tmp_path, stages=[StageRow("sft", "ran", 12.5, "8 steps"),
                                                StageRow("grpo", "skipped (done earlier)", None, "2 steps")],
                      sft_loss=[(1, 11.9), (2, 9.0), (3, 7.5)], grpo_reward=[(1, 0.0), (2, 0.25)],
                      grpo_steps=[{"step": 1, "reward/total_mean": 0.0}, {"step": 2, "reward/total_mean": 0.25}],
                      examples=[example], notes=["a note"], total_seconds=42.0)
    path = write_report(data, tmp_path / "report")

    text = path.read_text()
    assert "HEURISTIC" in text.split("## Stages")[0]
    assert "| sft | ran | 12.5 | 8 steps |" in text and "skipped (done earlier)" in text
    assert "loss 11.900 -> 7.500" in text and "a note" in text
    assert "<tool_call>" in text and "0.42" in text
    with Image.open(tmp_path / "report" / "curves.png") as chart:
        assert chart.size == (1040, 300)
        assert len(chart.getcolors(1 << 16)) > 3  # drawn lines and text, not a blank canvas
    links = [part.split(")")[0] for part in text.split("](")[1:]]
    assets = [link for link in links if link.startswith("assets/")]
    assert len(assets) == 3 and all((tmp_path / "report" / link).is_file() for link in assets)
    assert "curves.png" in links


def test_report_without_grpo_says_so(tmp_path: Path) -> None:
    data = ReportData(workdir=tmp_path, stages=[StageRow("grpo", "not run: GRPO trainer unavailable", None, "x")],
                      sft_loss=[(1, 3.0)], grpo_reward=[], notes=["The GRPO stage did not run"])
    text = write_report(data, tmp_path / "r").read_text()
    assert "not run: GRPO trainer unavailable" in text and "## GRPO steps" not in text
    assert (tmp_path / "r" / "curves.png").is_file()
