"""Server answers when inference goes wrong (agent.md §6.1): an exception is HTTP 200 `success: false`,
a timeout 504, no free device or a full queue 503, no pipeline an unhealthy `/health`."""

from __future__ import annotations

import threading
import time

import httpx

from gsjax.imagegen.server import ServerConfig, create_app
from gsjax.imagegen.worker import DevicePool, HealthPolicy
from tests.imagegen.fakes import FakeFactory
from tests.imagegen.loopback import LoopbackUvicorn


def serve(factory: FakeFactory, **policy: float) -> LoopbackUvicorn:
    pool = DevicePool(factory, ["cpu"], HealthPolicy(poll_interval_s=0.05, **policy))
    return LoopbackUvicorn(create_app(pool, ServerConfig()))


def wait_healthy(url: str) -> None:
    for _ in range(200):
        if httpx.get(url + "/health").json()["status"] == "healthy":
            return
        time.sleep(0.02)
    raise AssertionError("server never became healthy")


def test_inference_exception_is_http_200_with_success_false():
    with serve(FakeFactory()) as server:
        wait_healthy(server.url)
        reply = httpx.post(server.url + "/generate", json={"prompt": "fail now"})
    assert reply.status_code == 200
    assert reply.json() == {
        "success": False,
        "message": "Inference failed: RuntimeError: fake inference error for 'fail now'",
    }


def test_inference_timeout_is_a_504_and_disables_the_device():
    with serve(FakeFactory(delay_s=0.5), infer_timeout_s=0.1, cooldown_s=30) as server:
        wait_healthy(server.url)
        reply = httpx.post(server.url + "/generate", json={"prompt": "slow"})
        health = httpx.get(server.url + "/health").json()
    assert reply.status_code == 504
    assert "exceeded 0.1 s" in reply.json()["detail"]
    assert health["disabled_gpus"] == [0] and "timed out" in health["devices"][0]["last_error"]


def test_waiting_too_long_or_a_full_queue_is_a_503():
    gate = threading.Event()
    factory = FakeFactory(gate=gate)
    replies: list[httpx.Response] = []
    with serve(factory, wait_timeout_s=0.5, max_queue=1) as server:
        wait_healthy(server.url)
        first = threading.Thread(target=lambda: replies.append(httpx.post(server.url + "/generate", json={"prompt": "a"})))
        first.start()
        while not factory.calls:
            time.sleep(0.01)
        second = threading.Thread(target=lambda: replies.append(httpx.post(server.url + "/generate", json={"prompt": "b"})))
        second.start()
        while httpx.get(server.url + "/health").json()["queued"] < 1:
            time.sleep(0.01)
        full = httpx.post(server.url + "/generate", json={"prompt": "c"})
        second.join()
        gate.set()
        first.join()
    assert full.status_code == 503 and "queue is full" in full.json()["detail"]
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 503]
    timed_out = next(r for r in replies if r.status_code == 503)
    assert "no healthy device free within 0.5 s (cpu=busy)" in timed_out.json()["detail"]


def test_health_is_unhealthy_while_no_pipeline_could_be_loaded():
    with serve(FakeFactory(build_error="model_index.json not found"), cooldown_s=30) as server:
        for _ in range(200):
            health = httpx.get(server.url + "/health").json()
            if health.get("reason", "").startswith("no pipeline loaded"):
                break
            time.sleep(0.02)
    assert health["status"] == "unhealthy"
    assert "model_index.json not found" in health["reason"]
