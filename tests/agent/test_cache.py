"""Record/replay cache: keys, network-off replay, strict misses, error refetch, concurrent and killed writers."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from gsjax.agent.config import AgentConfig, ToolsConfig
from gsjax.agent.images import ImageStore
from gsjax.agent.loop import EpisodeResult, Task, run_episode
from gsjax.agent.tools import CacheMiss, CallResult, open_toolset
from gsjax.agent.tools.base import ImageHit, ToolContext, ToolOutput
from gsjax.agent.tools.cache import CacheCorrupt, ToolCache, cache_key
from tests.agent.fakes import FakeWeb, ScriptedPolicy, make_jpeg, research_steps, serper_config

PAGE_URL = "https://news.example/eiffel"


def stock(web: FakeWeb) -> None:
    web.image_items["eiffel tower"] = [{"title": f"pic {i}", "imageUrl": web.host_image(f"{i}.jpg", make_jpeg(i)),
                                        "link": f"https://pages.example/{i}"} for i in range(3)]
    web.pages[PAGE_URL] = "Eiffel Tower Brown."


def episode(cfg: ToolsConfig, cache: ToolCache, out: Path) -> EpisodeResult:
    async def main() -> EpisodeResult:
        async with open_toolset(cfg, cache) as tools:
            return await run_episode(Task("Paint the Eiffel Tower", task_id="rr"), ScriptedPolicy(research_steps(PAGE_URL)),
                                     tools, AgentConfig(date="2025-06-01"), out)

    return asyncio.run(main())


def observations(r: EpisodeResult, root: Path) -> list[tuple[str, list[str]]]:
    return [(m.text.replace(str(root), "<OUT>"), [i.sha256 for i in m.images]) for m in r.messages if m.role == "user"]


def test_keys_are_normalised_and_specific() -> None:
    a = cache_key("search", "serper", {}, {"queries": ["x"], "top_k": 5})
    assert a == cache_key("search", "serper", {}, {"top_k": 5, "queries": ["x"]})
    assert a != cache_key("search", "serper", {}, {"queries": ["x"], "top_k": 6})
    assert a != cache_key("search", "local", {}, {"queries": ["x"], "top_k": 5})
    assert a != cache_key("search", "serper", {"summary_model": "m"}, {"queries": ["x"], "top_k": 5})


def test_record_then_replay_with_the_network_off(web: FakeWeb, tmp_path: Path) -> None:
    stock(web)
    cfg = serper_config(web)
    cache_dir = tmp_path / "cache"
    rec = episode(cfg, ToolCache(cache_dir, "record"), tmp_path / "rec")
    assert [c.cache_status for c in rec.tool_calls] == ["recorded"] * 3
    served = len(web.log)
    web.stop()  # nothing answers on that port any more
    rep = episode(cfg, ToolCache(cache_dir, "replay"), tmp_path / "rep")
    assert [c.cache_status for c in rep.tool_calls] == ["hit"] * 3
    assert [c.cache_key for c in rep.tool_calls] == [c.cache_key for c in rec.tool_calls]
    assert observations(rep, tmp_path / "rep") == observations(rec, tmp_path / "rec")
    assert rep.prediction["reference_images"][0]["sha256"] == rec.prediction["reference_images"][0]["sha256"]
    assert Path(rep.prediction["reference_images"][0]["local_path"]).is_file()
    assert len(web.log) == served


def test_strict_replay_miss_is_a_clear_error(tmp_path: Path) -> None:
    cfg = ToolsConfig(backend="local")
    cache = ToolCache(tmp_path / "empty", "replay")
    r = episode(cfg, cache, tmp_path / "out")
    assert r.termination == "error"
    assert r.prediction["error"].startswith("cache_miss: replay cache")
    assert 'no entry for search {"queries":["eiffel tower paint colour"],"top_k":3}' in r.prediction["error"]

    async def direct() -> None:
        async with open_toolset(cfg, cache) as tools:
            tool = tools.get("search")
            await tools.call(tool, tool.parse_args({"queries": ["x"]})[0], ToolContext(ImageStore(tmp_path / "i")))

    with pytest.raises(CacheMiss, match="record it first"):
        asyncio.run(direct())


def _call(cfg: ToolsConfig, cache: ToolCache, store: Path) -> CallResult:
    async def main() -> CallResult:
        async with open_toolset(cfg, cache) as tools:
            tool = tools.get("search")
            return await tools.call(tool, tool.parse_args({"queries": ["q"]})[0], ToolContext(ImageStore(store)))

    return asyncio.run(main())


def test_replay_or_record_hits_and_refetches_recorded_errors(web: FakeWeb, tmp_path: Path) -> None:
    cfg = serper_config(web)
    web.inject("search", "500", "500", "500")
    first = _call(cfg, ToolCache(tmp_path / "c", "replay-or-record"), tmp_path / "s")
    assert first.output.error and first.cache_status == "recorded"
    strict = _call(cfg, ToolCache(tmp_path / "c", "replay"), tmp_path / "s")
    assert strict.cache_status == "hit" and strict.output == first.output  # strict replay is faithful
    second = _call(cfg, ToolCache(tmp_path / "c", "replay-or-record"), tmp_path / "s")
    assert second.output.error is None and second.cache_status == "recorded"
    third = _call(cfg, ToolCache(tmp_path / "c", "replay-or-record"), tmp_path / "s")
    assert third.cache_status == "hit" and third.output == second.output
    assert web.count("search") == 4


def test_concurrent_writers_leave_only_whole_entries(tmp_path: Path) -> None:
    cache = ToolCache(tmp_path / "c", "record")
    store = ImageStore(tmp_path / "ep")
    digests = [store.put(make_jpeg(i)) for i in range(4)]

    def write(n: int) -> None:
        hits = tuple(ImageHit("t", "u", "", d) for d in digests[: n % 4 + 1])
        out = ToolOutput(text="x" * (1000 + n), hits=hits)
        cache.record(cache_key("image_search", "b", {}, {"q": n % 3}), "image_search", "b", {}, {"q": n % 3},
                     out, 0.1, store)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = list((tmp_path / "c" / "entries").rglob("*"))
    files = [p for p in entries if p.is_file()]
    assert len(files) == 3 and not [p for p in files if p.name.endswith(".tmp")]
    for p in files:
        out = ToolOutput.from_record(json.loads(p.read_text())["output"])
        assert all(cache.images.has(h.sha256) for h in out.hits)


def test_a_killed_write_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ToolCache(tmp_path / "c", "replay-or-record")
    key = cache_key("search", "b", {}, {"q": 1})

    def die(*args: object) -> None:
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        cache.record(key, "search", "b", {}, {"q": 1}, ToolOutput(text="t"), 0.1, ImageStore(tmp_path / "e"))
    monkeypatch.undo()
    assert cache.lookup(key, ImageStore(tmp_path / "e")) is None
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_corrupt_entry_is_named(tmp_path: Path) -> None:
    cache = ToolCache(tmp_path / "c", "replay")
    key = cache_key("search", "b", {}, {})
    cache.entry_path(key).parent.mkdir(parents=True)
    cache.entry_path(key).write_text("{half")
    with pytest.raises(CacheCorrupt, match=key):
        cache.lookup(key, ImageStore(tmp_path / "e"))


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replay-or-record"):
        ToolCache(tmp_path, "live")
