"""JudgeClient against a loopback OpenAI-compatible server: retries, typed failures, cache."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from gsjax.rewards.judge_client import (
    JudgeClient,
    JudgeConfig,
    JudgeRequest,
    backoff_delay,
    encode_image_jpeg,
    extract_json_object,
)
from tests.rewards.fake_servers import LoopbackServer, Reply, chat, chat_json, image_parts, png_bytes, scripted

GOOD = {"rationale": "Constraints: x.", "faithfulness": 1, "visual_correctness": 0.5,
        "text_accuracy": 0.5, "aesthetics": 0, "text_accuracy_na": True}


def parse_ok(obj: dict) -> dict:
    """A minimal validator: every number must lie in [0, 1]."""
    for key, value in obj.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value <= 1:
            raise ValueError(f"{key}={value} out of range")
    return obj


def make_client(server: LoopbackServer, sleeps: list[float], **overrides) -> JudgeClient:
    settings = {"model": "judge-x", "max_attempts": 4, "timeout_s": 5.0, **overrides}
    config = JudgeConfig(base_url=server.base_url, api_key="k", **settings)
    return JudgeClient(config, sleep=sleeps.append, rng=random.Random(0))


def request(images=(png_bytes((1, 2, 3)), png_bytes((4, 5, 6))), text: str = "judge sample 7") -> JudgeRequest:
    return JudgeRequest(system="sys", user_text=text, images=images, rubric_version="r1")


def test_extract_json_object_handles_fences_prose_and_trailing_commas():
    assert extract_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json_object('Sure! {"a": {"b": [1, 2,],},} done') == {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json_object("no braces here")
    with pytest.raises(ValueError):
        extract_json_object("{not json at all}")


def test_backoff_follows_the_spec_schedule():
    rng = random.Random(1)
    for k, nominal in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (9, 10.0)]:
        delay = backoff_delay(k, 0.5, 10.0, rng)
        assert 0.8 * nominal <= delay <= 1.2 * nominal


def test_image_encoding_flattens_alpha_on_white_and_caps_the_longest_side():
    rgba = Image.new("RGBA", (4200, 10), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    url = encode_image_jpeg(buf.getvalue())
    assert url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "JPEG" and max(decoded.size) == 4096
    assert all(c > 245 for c in decoded.convert("RGB").getpixel((100, 5)))  # white, not red or black


def test_retries_through_every_transient_failure_then_succeeds():
    replies = [Reply(429, {"error": "slow down"}), Reply(503, "down"), chat("not json at all"),
               chat_json({**GOOD, "faithfulness": 7}), chat_json(GOOD)]
    sleeps: list[float] = []
    with LoopbackServer(scripted(replies)) as server:
        result = make_client(server, sleeps, max_attempts=5).judge(request(), parse_ok)
    assert result.ok and result.value["visual_correctness"] == 0.5
    assert result.attempts == 5 and server.count == 5
    assert len(sleeps) == 4 and all(0.8 * n <= s <= 1.2 * n for s, n in zip(sleeps, [0.5, 1, 2, 4]))
    path, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 8192
    assert [p["type"] for p in image_parts(body)] == ["image_url", "image_url"]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (chat("I'm sorry, but I can't help with comparing these people."), "refusal"),
        (chat(None, refusal="I cannot assist with that."), "refusal"),
        (chat("The image is fine. Scores: high."), "invalid_json"),
        (chat_json({**GOOD, "aesthetics": -2}), "invalid_values"),
        (chat(""), "empty_reply"),
        (Reply(500, "boom"), "http_500"),
        (Reply(429, "rate"), "rate_limited"),
        (Reply(200, "<html>proxy error</html>"), "malformed_response"),
    ],
)
def test_persistent_failure_is_recorded_with_its_reason_after_bounded_attempts(reply, reason):
    sleeps: list[float] = []
    with LoopbackServer(scripted([reply])) as server:
        result = make_client(server, sleeps, max_attempts=3).judge(request(), parse_ok)
    assert not result.ok and result.value is None
    assert result.failure.reason == reason
    assert result.failure.attempts == 3 and result.failure.history == (reason,) * 3
    assert server.count == 3 and len(sleeps) == 2


def test_timeouts_are_retried_then_recorded():
    with LoopbackServer(scripted([Reply(200, {"late": True}, delay_s=1.0)])) as server:
        result = make_client(server, [], max_attempts=2, timeout_s=0.2).judge(request(), parse_ok)
    assert result.failure.reason == "timeout" and result.failure.attempts == 2
    assert server.count == 2


def test_client_errors_that_cannot_heal_stop_at_once():
    with LoopbackServer(scripted([Reply(401, {"error": "bad key"})])) as server:
        result = make_client(server, []).judge(request(), parse_ok)
    assert result.failure.reason == "http_401" and "bad key" in result.failure.detail
    assert server.count == 1


def test_deadline_ends_retries_early():
    with LoopbackServer(scripted([Reply(503, "down")])) as server:
        result = make_client(server, [], max_attempts=30, backoff_base_s=5.0, deadline_s=1.0).judge(request(), parse_ok)
    assert server.count == 1 and "deadline" in result.failure.detail


def test_unreadable_image_is_replaced_by_a_warning_part():
    with LoopbackServer(scripted([chat_json(GOOD)])) as server:
        make_client(server, []).judge(request(images=(b"not an image", png_bytes((1, 1, 1)))), parse_ok)
    parts = image_parts(server.requests[0][1])
    assert parts[0]["type"] == "text" and "Image 1 could not be read" in parts[0]["text"]
    assert parts[1]["type"] == "image_url"


def test_cache_makes_rescoring_free_and_keys_on_content_model_and_rubric(tmp_path):
    with LoopbackServer(scripted([chat_json(GOOD)])) as server:
        client = make_client(server, [], cache_dir=tmp_path / "cache")
        first = client.judge(request(), parse_ok)
        again = [client.judge(request(), parse_ok) for _ in range(3)]
        assert server.count == 1
        assert first.ok and not first.cached and all(r.cached and r.value == first.value for r in again)
        # A fresh client (another process) reads the same cache.
        assert make_client(server, [], cache_dir=tmp_path / "cache").judge(request(), parse_ok).cached
        assert server.count == 1
        # Other image bytes, another model, another rubric version: each is a new call.
        client.judge(request(images=(png_bytes((9, 9, 9)), png_bytes((4, 5, 6)))), parse_ok)
        make_client(server, [], cache_dir=tmp_path / "cache", model="judge-y").judge(request(), parse_ok)
        client.judge(JudgeRequest("sys", "judge sample 7", request().images, "r2"), parse_ok)
        assert server.count == 4


def test_failures_are_not_cached(tmp_path):
    with LoopbackServer(scripted([chat("garbage"), chat_json(GOOD)])) as server:
        client = make_client(server, [], cache_dir=tmp_path / "c", max_attempts=1)
        assert not client.judge(request(), parse_ok).ok
        assert client.judge(request(), parse_ok).ok
        assert server.count == 2


def test_config_from_env_reads_upstream_variables():
    env = {"GEN_REWARD_API_BASE_URL": "http://h/v1", "GEN_REWARD_MODEL": "m", "GEN_REWARD_API_KEY": "s",
           "GEN_REWARD_MAX_TRY": "7"}
    cfg = JudgeConfig.from_env(env, timeout_s=3.0)
    assert (cfg.base_url, cfg.model, cfg.api_key, cfg.max_attempts, cfg.timeout_s) == ("http://h/v1", "m", "s", 7, 3.0)
