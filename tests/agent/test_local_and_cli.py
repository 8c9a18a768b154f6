"""The offline backend and its built-in corpus, and `gsjax agent run` end to end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from gsjax.agent.cli import agent_app
from gsjax.agent.config import ToolsConfig
from gsjax.agent.images import ImageStore
from gsjax.agent.tools import CallResult, open_toolset
from gsjax.agent.tools.base import ToolContext
from gsjax.agent.tools.local import BUILTIN_CORPUS, CorpusFormatError, LocalCorpus
from tests.agent.fakes import FakeWeb, http_script, research_steps

POLICY_KEY_ENV = "GSJAX_POLICY_API_KEY"


def local_call(name: str, raw: dict[str, object], store: Path, corpus_dir: str = "") -> CallResult:
    async def main() -> CallResult:
        async with open_toolset(ToolsConfig(backend="local", local_corpus_dir=corpus_dir)) as tools:
            tool = tools.get(name)
            return await tools.call(tool, tool.parse_args(raw)[0], ToolContext(ImageStore(store)))

    return asyncio.run(main())


def test_builtin_corpus_is_small_and_valid() -> None:
    size = sum(p.stat().st_size for p in BUILTIN_CORPUS.rglob("*") if p.is_file())
    assert size < 1_000_000
    corpus = LocalCorpus.load()
    assert len(corpus.docs) >= 30 and len(corpus.images) >= 8
    assert len({d.id for d in corpus.docs}) == len(corpus.docs)
    for img in corpus.images:
        with Image.open(BUILTIN_CORPUS / "images" / img.file) as im:
            im.verify()


def test_local_search_ranks_with_bm25(tmp_path: Path) -> None:
    out = local_call("search", {"queries": ["malachite trophy Gazzaniga", "zzzz qqqq"], "top_k": 2}, tmp_path).output
    first, second = out.text.split("\n\n--- search result for [zzzz qqqq] ---")
    assert first.startswith("--- search result for [malachite trophy Gazzaniga] ---\n[FIFA World Cup Trophy]"
                            "(https://kb.gsjax.example/fifa-world-cup-trophy)")
    assert "No results for 'zzzz qqqq'." in second


def test_local_image_search_and_browse(tmp_path: Path) -> None:
    r = local_call("image_search", {"query": "golden gate bridge orange"}, tmp_path)
    assert r.output.hits[0].title == "Golden Gate Bridge"
    assert ImageStore(tmp_path).has(r.output.hits[0].sha256)
    assert "No usable images" in local_call("image_search", {"query": "xylophone"}, tmp_path).output.text
    page = local_call("browse", {"url": "https://kb.gsjax.example/stanley-cup", "query": "height"}, tmp_path).output
    assert page.text.startswith("Page: Stanley Cup") and "89.5 centimetres" in page.text
    miss = local_call("browse", {"url": "https://elsewhere.example/", "query": "q"}, tmp_path).output
    assert miss.error_code == "not_found" and "not a page of the local corpus" in miss.text


def test_corpus_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "title": "t", "url": "u", "text": "x"}\n{"id": 3}\n')
    with pytest.raises(CorpusFormatError, match=r"docs.jsonl:2"):
        LocalCorpus.load(tmp_path)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(agent_app, name="agent")
    return app


def test_cli_runs_an_offline_episode_and_saves_it(web: FakeWeb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.agent.fakes import POLICY_KEY

    monkeypatch.setenv(POLICY_KEY_ENV, POLICY_KEY)
    web.policy_script = http_script(research_steps("https://kb.gsjax.example/eiffel-tower"))
    args = ["agent", "run", "--prompt", "Paint the Eiffel Tower", "--tools", "local", "--policy-url",
            f"{web.base}/v1", "--out", str(tmp_path / "runs"), "--date", "2025-06-01", "--task-id", "cli",
            "--cache", str(tmp_path / "cache"), "--cache-mode", "record"]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert "tool search" in res.output and "termination" in res.output and "answer" in res.output
    rec = json.loads((tmp_path / "runs" / "cli_0" / "result.json").read_text())
    assert rec["termination"] == "answer" and rec["prediction"]["reference_images"][0]["img_id"] == "IMG_001"
    assert POLICY_KEY not in res.output and POLICY_KEY not in json.dumps(rec)
    assert list((tmp_path / "cache" / "entries").rglob("*.json"))

    miss = args[:-2] + ["--cache-mode", "replay", "--task-id", "cli2"]
    miss[miss.index("--cache") + 1] = str(tmp_path / "empty-cache")
    res = CliRunner().invoke(_app(), miss)
    assert res.exit_code == 1 and "cache_miss" in res.output


def test_cli_rejects_bad_options(tmp_path: Path) -> None:
    res = CliRunner().invoke(_app(), ["agent", "run", "--prompt", "x", "--cache-mode", "replay"])
    assert res.exit_code != 0 and "needs --cache" in res.output
    res = CliRunner().invoke(_app(), ["agent", "run", "--prompt", "x", "--tools", "bing"])
    assert res.exit_code != 0 and "serper or local" in res.output
