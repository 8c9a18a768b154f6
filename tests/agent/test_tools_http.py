"""The three web tools against the loopback fake: protocols, injected faults, guards and caps."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gsjax.agent.config import Secret, ToolsConfig
from gsjax.agent.images import ImageStore
from gsjax.agent.tools import CallResult, open_toolset
from gsjax.agent.tools.base import ToolContext, ToolRefused, check_url_syntax, guard_url
from tests.agent.fakes import JINA_KEYS, SERPER_KEY, FakeWeb, make_jpeg, serper_config


def call(cfg: ToolsConfig, name: str, raw: dict[str, Any], store_dir: Path) -> CallResult:
    async def main() -> CallResult:
        async with open_toolset(cfg) as ts:
            tool = ts.get(name)
            args, _ = tool.parse_args(raw)
            return await ts.call(tool, args, ToolContext(ImageStore(store_dir)))

    return asyncio.run(main())


# ---------------------------------------------------------------------- search


def test_search_protocol_and_rendering(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    web.organic["eiffel colour"] = [{"title": "<b>Eiffel</b> Tower", "link": "https://e.x/1", "snippet": "Brown <b>paint</b>"}]
    r = call(tools_cfg, "search", {"queries": ["eiffel 'colour'", "golden gate"], "top_k": 2}, tmp_path)
    out = r.output
    assert out.error is None
    assert out.text.startswith("--- search result for [eiffel 'colour'] ---\n[Eiffel Tower](https://e.x/1) Brown paint")
    assert "--- search result for [golden gate] ---" in out.text and out.text.count("--- end of search result ---") == 2
    reqs = [x for x in web.log if x["route"] == "search"]
    assert sorted(x["body"]["q"] for x in reqs) == ["eiffel colour", "golden gate"]
    assert all(x["body"]["num"] == 2 and x["headers"]["X-API-KEY"] == SERPER_KEY for x in reqs)


@pytest.mark.parametrize("fault", ["500", "429", "timeout", "garbage", "error_json"])
def test_search_recovers_from_one_fault(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path, fault: str) -> None:
    web.inject("search", fault)
    r = call(tools_cfg, "search", {"queries": ["q"]}, tmp_path)
    assert r.output.error is None and "[q page 0](https://example.com/0)" in r.output.text
    assert web.count("search") == 2


@pytest.mark.parametrize("fault, reason", [("500", "HTTP 500"), ("garbage", "not JSON"),
                                           ("error_json", "Query failed for key ***")])
def test_search_reports_persistent_faults(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path, fault: str,
                                          reason: str) -> None:
    web.inject("search", fault, fault, fault)
    r = call(tools_cfg, "search", {"queries": ["q"]}, tmp_path)
    assert web.count("search") == 3  # bounded: max_attempts
    assert "Search failed for 'q'" in r.output.text and reason in r.output.text and "3 attempt(s)" in r.output.text
    assert r.output.error and SERPER_KEY not in r.output.text + r.output.error


def test_search_slow_response_still_succeeds(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    web.inject("search", "slow")
    assert call(tools_cfg, "search", {"queries": ["q"]}, tmp_path).output.error is None
    assert web.count("search") == 1


def test_search_missing_key_is_reported(web: FakeWeb, tmp_path: Path) -> None:
    r = call(serper_config(web, serper_key=Secret("")), "search", {"queries": ["q"]}, tmp_path)
    assert "SERPER_KEY_ID is not set" in r.output.text and web.count("search") == 0


def test_tool_deadline_bounds_the_whole_call(web: FakeWeb, tmp_path: Path) -> None:
    web.inject("search", "timeout", "timeout", "timeout")
    r = call(serper_config(web, tool_deadline_s=0.3), "search", {"queries": ["q"]}, tmp_path)
    assert r.output.error_code == "timeout" and "0.3 s deadline" in r.output.text and r.latency_s < 1.0


# ---------------------------------------------------------------------- image search


def _images(web: FakeWeb, query: str, n: int, start: int = 0) -> list[bytes]:
    blobs = [make_jpeg(100 + start + i) for i in range(n)]
    web.image_items[query] = [{"title": f"pic {start + i}", "imageUrl": web.host_image(f"p{start + i}.jpg", b),
                               "link": f"https://pages.example/{start + i}"} for i, b in enumerate(blobs)]
    return blobs


def test_image_search_downloads_verifies_and_reencodes(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    _images(web, "eiffel", 6)
    r = call(tools_cfg, "image_search", {"query": "eiffel", "top_k": 3, "save_dir": "/etc"}, tmp_path)
    hits = r.output.hits
    assert [h.title for h in hits] == ["pic 0", "pic 1", "pic 2"] and r.output.error is None
    for h in hits:
        img = Image.open(io.BytesIO(ImageStore(tmp_path).get(h.sha256)))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert h.page_url.startswith("https://pages.example/")
    req = next(x for x in web.log if x["route"] == "images")
    assert req["body"] == {"q": "eiffel", "num": 10}
    # downloads run concurrently, so the log's order is not the hits' order: each carries its own page
    downloads = {x["path"]: x["headers"] for x in web.log if x["route"] == "img"}
    for i in range(3):
        headers = downloads[f"/img/p{i}.jpg"]
        assert headers["Referer"] == f"https://pages.example/{i}" and "Mozilla" in headers["User-Agent"]


def test_image_search_rejects_bad_candidates_and_says_why(web: FakeWeb, tmp_path: Path) -> None:
    cfg = serper_config(web, image_max_bytes=60_000)
    good = make_jpeg(7)
    png = make_jpeg(8, fmt="PNG")
    big = make_jpeg(9, size=(400, 400), fmt="PNG")
    web.image_items["mixed"] = [
        {"title": "html", "imageUrl": web.host_image("a.html", b"<html>" + b"x" * 4000, "text/html")},
        {"title": "tiny", "imageUrl": web.host_image("tiny.jpg", good[:500])},
        {"title": "broken", "imageUrl": web.host_image("broken.jpg", b"\xff\xd8" + b"\x00" * 5000)},
        {"title": "big", "imageUrl": web.host_image("big.png", big, "image/png")},
        {"title": "gone", "imageUrl": f"{web.base}/img/missing.jpg"},
        {"title": "ok", "imageUrl": web.host_image("ok.jpg", good)},
        {"title": "ok png", "imageUrl": web.host_image("ok.png", png, "")},
    ]
    r = call(cfg, "image_search", {"query": "mixed"}, tmp_path)
    assert [h.title for h in r.output.hits] == ["ok", "ok png"]
    (note,) = r.output.notes
    assert note.startswith("5 of 7 candidate image(s) could not be used")
    for reason in ("not an image", "too large", "http error 404"):
        assert reason in note


def test_image_search_no_usable_results_is_explicit(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    web.image_items["junk"] = [{"title": "html", "imageUrl": web.host_image("j.html", b"<p>" * 600, "text/html")}]
    r = call(tools_cfg, "image_search", {"query": "junk"}, tmp_path)
    assert not r.output.hits and "No usable images were found for [junk]" in r.output.text
    assert "1x not an image" in r.output.text and "at most 3 words" in r.output.text
    r2 = call(tools_cfg, "image_search", {"query": "nothing at all"}, tmp_path)
    assert "No usable images were found" in r2.output.text
    assert web.count("images") == 2  # one request each: no refetch storm on empty results


def test_image_search_fetches_a_second_page_when_short(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    web.image_items["deep"] = ([{"title": f"bad{i}", "imageUrl": web.host_image(f"b{i}.txt", b"." * 2000, "text/plain")}
                                for i in range(10)]
                               + [{"title": "late", "imageUrl": web.host_image("late.jpg", make_jpeg(50))}])
    r = call(tools_cfg, "image_search", {"query": "deep", "top_k": 2}, tmp_path)
    assert [h.title for h in r.output.hits] == ["late"]
    assert [x["body"]["num"] for x in web.log if x["route"] == "images"] == [10, 20]


@pytest.mark.parametrize("fault, reason", [("500", "HTTP 500"), ("timeout", "timed out"), ("garbage", "not JSON"),
                                           ("error_json", "image search failed upstream")])
def test_image_search_endpoint_failures_reach_the_model(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path,
                                                        fault: str, reason: str) -> None:
    _images(web, "eiffel", 2)
    web.inject("images", fault, fault, fault)
    r = call(tools_cfg, "image_search", {"query": "eiffel"}, tmp_path)
    assert r.output.text.startswith("[ImageSearch] Error:") and reason in r.output.text
    assert r.output.error and web.count("images") == 3


def test_image_download_faults_retry_then_note(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    _images(web, "eiffel", 2)
    web.inject("img", "500")  # first download attempt fails, its retry succeeds
    r = call(tools_cfg, "image_search", {"query": "eiffel", "top_k": 2}, tmp_path)
    assert len(r.output.hits) == 2 and not r.output.notes
    web.inject("img", "garbage", "garbage", "garbage", "garbage", "garbage", "garbage")
    r = call(tools_cfg, "image_search", {"query": "eiffel", "top_k": 2}, tmp_path)
    assert not r.output.hits and "not an image" in r.output.text


def test_image_redirects_are_followed_and_each_hop_is_guarded(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = web.host_image("private.jpg", make_jpeg(60))
    web.image_items["hop"] = [{"title": "hop", "imageUrl": web.host_redirect("hop.jpg", "/img/private.jpg")}]
    r = call(tools_cfg, "image_search", {"query": "hop"}, tmp_path)
    assert [h.title for h in r.output.hits] == ["hop"]  # relative Location resolved and followed

    async def refuse_private(url: str, allow_private: bool) -> None:
        if url == target:
            raise ToolRefused(f"URL {url!r} refused: test says private")

    monkeypatch.setattr("gsjax.agent.tools.image_search.guard_url", refuse_private)
    served = web.count("img")
    r = call(tools_cfg, "image_search", {"query": "hop"}, tmp_path)
    assert not r.output.hits and "1x refused" in r.output.text
    assert web.count("img") == served + 1  # the redirect target was never fetched


# ---------------------------------------------------------------------- browse


def test_browse_reads_then_summarises(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    web.pages["https://news.example/a"] = "The trophy is 36.8 cm tall and made of gold."
    r = call(tools_cfg, "browse", {"url": "https://news.example/a", "goal": "height"}, tmp_path)
    assert r.output.text == "SUMMARY: height" and r.output.error is None
    (req,) = [x for x in web.log if x["route"] == "summary"]
    prompt = req["body"]["messages"][0]["content"]
    assert "---begin of source content---\nThe trophy is 36.8 cm tall" in prompt and req["body"]["temperature"] == 0.0
    jina = next(x for x in web.log if x["route"] == "jina")
    assert jina["headers"]["Authorization"] == f"Bearer {JINA_KEYS[0]}"


def test_browse_reader_errors_never_reach_the_summariser(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    r = call(tools_cfg, "browse", {"url": ["https://news.example/missing", "https://news.example/b"], "query": "q"},
             tmp_path)
    assert "Browse error for https://news.example/missing" in r.output.text and "HTTP 404" in r.output.text
    assert "\n\n=======\n\n" in r.output.text and web.count("summary") == 0 and r.output.error


def test_browse_rotates_keys_on_429(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    web.pages["https://news.example/a"] = "text"
    web.rate_limited_keys.add(JINA_KEYS[0])
    r = call(tools_cfg, "browse", {"url": "https://news.example/a", "query": "q"}, tmp_path)
    assert r.output.error is None
    keys = [x["headers"]["Authorization"] for x in web.log if x["route"] == "jina"]
    assert keys == [f"Bearer {JINA_KEYS[0]}", f"Bearer {JINA_KEYS[1]}"]


def test_browse_caps_the_page(web: FakeWeb, tmp_path: Path) -> None:
    web.pages["https://news.example/long"] = "word " * 20_000
    r = call(serper_config(web, max_page_chars=1000), "browse", {"url": "https://news.example/long", "query": "q"},
             tmp_path)
    assert "longer than 1000 characters" in r.output.text
    prompt = next(x for x in web.log if x["route"] == "summary")["body"]["messages"][0]["content"]
    page = prompt.split("---begin of source content---\n")[1].split("\n---end of source content---")[0]
    assert len(page) == 1000


def test_browse_summary_failure_falls_back_to_raw_page(web: FakeWeb, tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    web.pages["https://news.example/a"] = "raw facts here"
    web.inject("summary", "500", "timeout", "garbage")
    r = call(tools_cfg, "browse", {"url": "https://news.example/a", "query": "q"}, tmp_path)
    assert r.output.text.startswith("[Summary unavailable (") and r.output.text.endswith("\nraw facts here")
    assert r.output.error and web.count("summary") == 3


def test_browse_splits_long_pages_into_parts(web: FakeWeb, tmp_path: Path) -> None:
    web.pages["https://news.example/long"] = " ".join(f"fact{i}" for i in range(400))
    cfg = serper_config(web, summary_chunk_tokens=300, summary_chunk_overlap=20)
    r = call(cfg, "browse", {"url": "https://news.example/long", "query": "q"}, tmp_path)
    parts = web.count("summary")
    assert parts >= 2 and r.output.text.startswith(f"The page was long, so it was read in {parts} parts")
    assert f"--- begin of result part {parts} ---" in r.output.text
    prompt = next(x for x in web.log if x["route"] == "summary")["body"]["messages"][0]["content"]
    assert "--- begin of source content ---" in prompt


# ---------------------------------------------------------------------- URL guard


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://example.com/x", "gopher://example.com", "http://127.0.0.1:8080/",
    "http://localhost/admin", "http://api.localhost/", "http://10.1.2.3/", "http://192.168.0.1/",
    "http://172.16.5.4/", "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://0.0.0.0/",
    "http://[::ffff:127.0.0.1]/", "http://printer.local/", "http:///nohost", "http://[fe80::1]/",
])
def test_guard_refuses_local_and_non_http(url: str) -> None:
    with pytest.raises(ToolRefused):
        check_url_syntax(url, allow_private=False)


def test_guard_allows_public_and_the_explicit_flag() -> None:
    assert check_url_syntax("https://example.com/a?b=1", allow_private=False) == ("https", "example.com")
    assert check_url_syntax("http://127.0.0.1:9/", allow_private=True) == ("http", "127.0.0.1")
    with pytest.raises(ToolRefused, match="only http and https"):
        check_url_syntax("file:///etc/passwd", allow_private=True)
    asyncio.run(guard_url("http://127.0.0.1:9/", allow_private=True))


def test_browse_and_downloads_refuse_loopback_without_the_flag(web: FakeWeb, tmp_path: Path) -> None:
    cfg = serper_config(web, allow_private_urls=False)
    r = call(cfg, "browse", {"url": f"{web.base}/secret", "query": "q"}, tmp_path)
    assert "refused" in r.output.text and r.output.error_code == "refused" and web.count("jina") == 0
    _images(web, "eiffel", 2)
    r = call(cfg, "image_search", {"query": "eiffel"}, tmp_path)
    assert not r.output.hits and "2x refused" in r.output.text and web.count("img") == 0
