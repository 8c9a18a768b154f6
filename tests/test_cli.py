"""The top-level command line: a user's mistake is one line naming the culprit (exit status 2, no traceback);
`--version` names the packages that decide the numerics."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest
from typer.testing import CliRunner

from gsjax.cli import app
from gsjax.errors import TRACEBACK_ENV, InputFileNotFound, RecordFileError
from gsjax.fileio import read_json_records
from gsjax.parallel.mesh import MeshError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def _one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert f"Error: {expected}" in result.output
    assert "Traceback" not in result.output and "raise " not in result.output
    assert f"set {TRACEBACK_ENV}=1" in result.output


def test_config_typo_and_missing_recipe_are_one_line(tmp_path: Path) -> None:
    _one_line_error(_run("sft", CONFIGS / "sft_tiny_cpu.yaml", "train.stepz=3"),
                    "SFTConfigError: unknown config key 'train.stepz'; did you mean 'train.steps'?")
    _one_line_error(_run("grpo", tmp_path / "nope.yaml"),
                    f"GRPOConfigError: {tmp_path / 'nope.yaml'}: no such recipe file")


def test_a_mesh_that_does_not_fit_names_its_axes(tmp_path: Path) -> None:
    slots = jax.device_count() + 1
    result = _run("sft", CONFIGS / "sft_tiny_cpu.yaml", f"mesh.fsdp={slots}", f"train.out_dir={tmp_path / 'run'}")
    _one_line_error(result, f"MeshError: mesh {{'data': 1, 'fsdp': {slots}, 'expert': 1, 'tensor': 1}} has {slots} "
                            f"slots but {jax.device_count()} devices are present")
    assert not (tmp_path / "run").exists()


def test_broken_and_missing_prompt_files_name_the_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "rl.jsonl"
    broken.write_text(json.dumps({"id": 1, "prompt": "draw a", "gt_image": "a.png"}) + "\n{oops\n")
    common = (CONFIGS / "grpo_tiny_cpu.yaml", f"train.out_dir={tmp_path / 'run'}")
    _one_line_error(_run("grpo", *common, f"data.path={broken}"), f"RecordFileError: {broken}:2: not a JSON line")
    missing = tmp_path / "none.jsonl"
    _one_line_error(_run("grpo", *common, f"data.path={missing}"),
                    f"InputFileNotFound: RL prompt file not found: {missing}")


def test_the_traceback_is_there_on_request(tmp_path: Path) -> None:
    result = _run("sft", CONFIGS / "sft_tiny_cpu.yaml", f"mesh.fsdp={jax.device_count() + 1}",
                  f"train.out_dir={tmp_path / 'run'}", env={TRACEBACK_ENV: "1"})
    assert result.exit_code == 1 and isinstance(result.exception, MeshError)


def test_datasets_that_leave_nothing_to_train_on_are_input_errors(tmp_path: Path) -> None:
    empty = tmp_path / "sft.json"
    empty.write_text("[]")
    _one_line_error(_run("sft", CONFIGS / "sft_tiny_cpu.yaml", f"data.path={empty}", f"train.out_dir={tmp_path / 'a'}"),
                    f"RecordFileError: no usable SFT record in {empty}: all 0 were refused")
    (tmp_path / "gt.png").write_bytes(b"png")
    prompts = tmp_path / "rl.json"
    prompts.write_text(json.dumps([{"id": 1, "prompt": "draw a", "gt_image": "gt.png"}, {"id": 2, "prompt": "b"}]))
    _one_line_error(_run("grpo", CONFIGS / "grpo_tiny_cpu.yaml", f"data.path={prompts}", "rollout.prompts_per_step=2",
                         f"train.out_dir={tmp_path / 'b'}"),
                    "RecordFileError: 1 usable prompts (1 skipped: {'missing_field': 1}) do not fill one step's 2 "
                    "(rollout.prompts_per_step)")


@pytest.mark.parametrize("internal", [RuntimeError("boom"), ValueError("a bug, not an input")])
def test_other_errors_keep_their_traceback(internal: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only input errors are shortened: a failure inside the code is raised as itself, traceback and all."""
    import gsjax.train.sft

    def fail(*args, **kwargs):
        raise internal

    monkeypatch.setattr(gsjax.train.sft, "run_sft", fail)
    result = _run("sft", CONFIGS / "sft_tiny_cpu.yaml")
    assert result.exit_code == 1 and result.exception is internal
    assert "Error: " not in result.output


def test_record_files_read_the_same_as_array_or_lines_and_name_the_broken_line(tmp_path: Path) -> None:
    rows = [{"id": 1, "x": "é"}, {"id": 2}]
    array, lines = tmp_path / "a.json", tmp_path / "b.jsonl"
    array.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_json_records(array) == read_json_records(lines) == rows
    array.write_text('[\n  {"id": 1},\n  {"id": 2,}\n]')
    with pytest.raises(RecordFileError, match=r"a\.json:3: not a JSON array \(.*column 12\)"):
        read_json_records(array)
    with pytest.raises(InputFileNotFound, match="benchmark not found: .*missing.json"):
        read_json_records(tmp_path / "missing.json", "benchmark")


def test_version_names_gsjax_jax_and_flax() -> None:
    from importlib.metadata import version

    import gsjax

    result = _run("--version")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"gsjax {gsjax.__version__} (jax {version('jax')}, jaxlib {version('jaxlib')}, "
                                    f"flax {version('flax')}, ")
