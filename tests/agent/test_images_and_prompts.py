"""Image handling (resize, verify, re-encode, content-addressed store, IMG ids) and prompt contents."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from gsjax.agent.config import AgentConfig, ToolsConfig, agent_config_from_env, public_dict, tools_config_from_env
from gsjax.agent.images import (
    ImageDecodeError,
    ImageRegistry,
    ImageStore,
    decode_verified,
    policy_view,
    reencode_download,
    smart_resize,
)
from gsjax.agent.prompts import final_step_notice, invalid_format_notice, system_prompt, too_long_notice
from gsjax.agent.tools.browse import browse_schema
from gsjax.agent.tools.image_search import image_search_schema
from gsjax.agent.tools.search import search_schema
from tests.agent.fakes import make_jpeg


@pytest.mark.parametrize("h, w", [(64, 64), (1000, 3000), (4000, 4000), (33, 1700), (480, 640)])
def test_smart_resize_bounds(h: int, w: int) -> None:
    rh, rw = smart_resize(h, w, 32, 65_536, 160_000)
    assert rh % 32 == 0 and rw % 32 == 0
    assert rh * rw <= 160_000
    assert rh * rw >= 65_536 or min(rh, rw) == 32  # extreme aspect ratios hit the one-patch floor


def test_policy_view_is_deterministic_and_capped() -> None:
    data = make_jpeg(1, size=(900, 700))
    a, w, h = policy_view(data, 32, 65_536, 160_000)
    assert (a, w, h) == policy_view(data, 32, 65_536, 160_000)
    assert Image.open(io.BytesIO(a)).size == (w, h) and w * h <= 160_000


def test_reencode_rejects_garbage_truncated_and_bombs() -> None:
    good = make_jpeg(2)
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        reencode_download(b"<html>hello</html>" * 100, 85, 10_000_000)
    with pytest.raises(ImageDecodeError):
        reencode_download(good[: len(good) // 2], 85, 10_000_000)
    with pytest.raises(ImageDecodeError, match="exceeds the cap"):
        decode_verified(make_jpeg(3, size=(200, 200)), max_pixels=100 * 100)


def test_reencode_composites_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    out = Image.open(io.BytesIO(reencode_download(buf.getvalue(), 85, 10_000_000)))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert all(c > 240 for c in out.getpixel((20, 20)))


def test_store_is_content_addressed_under_concurrent_writers(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    blobs = [make_jpeg(i) for i in range(6)]
    digests: list[str] = []
    lock = threading.Lock()

    def put(b: bytes) -> None:
        d = store.put(b)
        with lock:
            digests.append(d)

    threads = [threading.Thread(target=put, args=(blobs[i % 6],)) for i in range(36)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(digests)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{d}.jpg" for d in set(digests))
    for d in set(digests):
        assert store.get(d) in blobs


def test_short_store_names_keep_the_full_hash_check(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, name_chars=16)
    digest = store.put(make_jpeg(0))
    assert len(digest) == 64 and store.path(digest).name == f"{digest[:16]}.jpg" and store.get(digest) == make_jpeg(0)
    # other bytes under the same short name (a clash, or a damaged file) are refused, never returned
    store.path(digest).write_bytes(make_jpeg(1))
    with pytest.raises(ImageDecodeError, match="content hash"):
        store.get(digest)
    with pytest.raises(ValueError, match="name_chars"):
        ImageStore(tmp_path, name_chars=4)


def test_registry_ids_count_from_one_and_reuse() -> None:
    reg = ImageRegistry()
    a = reg.register(sha256="a", local_path="/a", title="t", url="u1", page_url="")
    b = reg.register(sha256="b", local_path="/b", title="t", url="u2", page_url="")
    again = reg.register(sha256="a", local_path="/a", title="other", url="u3", page_url="")
    assert (a.img_id, b.img_id, again.img_id) == ("IMG_001", "IMG_002", "IMG_001")
    assert "IMG_002" in reg and "IMG_003" not in reg


def _prompt(max_refs: int = 3) -> str:
    cfg = ToolsConfig()
    return system_prompt([search_schema(cfg), image_search_schema(cfg), browse_schema(cfg)], 8, max_refs, "2031-02-03")


def test_system_prompt_covers_the_spec_points_in_order() -> None:
    text = _prompt()
    assert text.endswith("\n 2031-02-03")
    checkpoints = [
        "real-world subjects",                      # role and goal
        "exactly one of",                           # strict format
        "never a tool call without a <think>",
        "FINAL STEP", "Final Step Reached",         # exception (a)
        "RESPONSE TOO LONG", "TRUNCATED",           # exception (b)
        "at most 8 tool calls", "image_search at least once", "near-duplicates",
        "one image search per distinct visual subject", "browse only when",
        "IMG_001", "never URLs or file paths",      # identifiers
        "one image per image search",               # selection
        "duplicates whatever the angle or crop",    # de-duplication
        "the first reference image", "the only reference image", "Never write IMG ids in gen_prompt",
        "Keep <think> short",                       # think content
        "composition, camera, lighting, wardrobe, props, background",
        "1 to 3 items",                             # count from config, same as the validator
        "The order you write is the order of the ordinals",
        "Do not invent facts or URLs", "Do not paste the whole user request",
        "Only one function may be called per round", "<tools>", "</tools>",
        "never repeat a search",
    ]
    pos = 0
    for phrase in checkpoints:
        found = text.find(phrase, pos)
        assert found >= 0, f"system prompt lacks (or misorders) {phrase!r}"
        pos = found
    tools_block = text[text.index("<tools>\n") + 8: text.index("\n</tools>")]
    names = [json.loads(line)["function"]["name"] for line in tools_block.splitlines()]
    assert names == ["search", "image_search", "browse"]
    assert "sort" not in text.lower() and "7B" not in text
    assert "1 to 5 items" in _prompt(5)


def test_compact_system_prompt_keeps_the_protocol_in_a_quarter_of_the_text() -> None:
    cfg = ToolsConfig()
    schemas = [search_schema(cfg), image_search_schema(cfg), browse_schema(cfg)]
    text = system_prompt(schemas, 6, 2, "2031-02-03", style="compact")
    assert text.endswith("\n 2031-02-03")
    for phrase in ("<think>...</think>", "<tool_call>", '{"name": <function-name>, "arguments": <args-json-object>}',
                   "<answer>", "FINAL STEP", "RESPONSE TOO LONG", "TRUNCATED", "At most 6 tool calls",
                   "image_search at least once", "1 to 2 reference images", '"gen_prompt"', '"reference_images"',
                   "the first reference image"):
        assert phrase in text, phrase
    # each tool as a signature from its schema: required args plain, optional ones marked
    assert "- search(queries: list[string], top_k?: integer): Web search." in text
    assert "- image_search(query: string, top_k?: integer): Image search." in text
    assert "- browse(url: string, query: string): Read a web page" in text
    assert len(text) * 3 < len(system_prompt(schemas, 6, 2, "2031-02-03"))
    assert "with 1 reference image," in system_prompt(schemas, 6, 1, "2031-02-03", style="compact")


def test_unknown_system_prompt_style_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'terse'.*full, compact"):
        system_prompt([], 8, 3, "2031-02-03", style="terse")
    with pytest.raises(ValueError, match="AgentConfig.system_prompt.*'terse'"):
        AgentConfig(system_prompt="terse")


def test_notices_carry_their_trigger_words() -> None:
    final = final_step_notice(3)
    assert "FINAL STEP" in final and "<answer>" in final and "gen_prompt" in final and "ignored" in final
    assert "RESPONSE TOO LONG" in too_long_notice() and "TRUNCATED" in too_long_notice()
    bad = invalid_format_notice("the response was empty")
    assert "<tool_response>" not in bad and "invalid format" in bad and "not both" in bad and "the response was empty" in bad


def test_env_configs_and_secret_hiding() -> None:
    env = {"SERPER_KEY_ID": "sk-serper-1234", "JINA_API_KEYS": " j1-key-aaaa, j2-key-bbbb ,",
           "MAX_LLM_CALL_PER_RUN": "0", "GEN_MAX_NEW_TOKENS_PER_TURN": "512", "QWEN_VL_MAX_PIXELS": "200704",
           "TEXT_SEARCH_API_BASE_URL": "https://search.example/s"}
    tools = tools_config_from_env(env, backend="local")
    assert tools.jina_keys.keys() == ("j1-key-aaaa", "j2-key-bbbb") and tools.backend == "local"
    assert tools.text_search_url == "https://search.example/s"
    agent = agent_config_from_env(env, date="2030-01-02")
    assert (agent.max_llm_calls, agent.max_new_tokens_per_turn, agent.image_max_pixels) == (1, 512, 200704)
    shown = repr(tools) + str(tools.serper_key) + json.dumps(public_dict(tools))
    assert "sk-serper" not in shown and "j1-key" not in shown and public_dict(tools)["serper_key"] == "<set>"
    with pytest.raises(ValueError, match="GEN_MAX_NEW_TOKENS_PER_TURN='lots'"):
        agent_config_from_env({"GEN_MAX_NEW_TOKENS_PER_TURN": "lots"})


def test_agent_config_validates() -> None:
    with pytest.raises(ValueError, match="max_llm_calls"):
        AgentConfig(max_llm_calls=0)
    with pytest.raises(ValueError):
        AgentConfig(date="June 1st")
