"""DevicePool: FIFO hand-out of devices, one call per device, timeouts, health and reloads (agent.md §6.2)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gsjax.imagegen.schema import GenerationParams
from gsjax.imagegen.worker import (
    DevicePool,
    HealthPolicy,
    InferenceError,
    InferenceTimeout,
    NoDeviceAvailable,
    is_device_fatal,
)
from tests.imagegen.fakes import FakeFactory

FAST = {"poll_interval_s": 0.02, "cooldown_s": 0.05}


def params(prompt: str = "a lighthouse", **kw: object) -> GenerationParams:
    return GenerationParams(prompt=prompt, **kw)


async def started(pool: DevicePool) -> DevicePool:
    await pool.start()
    for _ in range(500):
        if pool.health().status == "healthy" and not any(w.reloading for w in pool.workers):
            return pool
        await asyncio.sleep(0.01)
    raise AssertionError(f"pool never became healthy: {pool.health()}")


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_requests_are_served_one_at_a_time_in_arrival_order():
    gate = threading.Event()
    factory = FakeFactory(gate=gate)

    async def main() -> list:
        pool = await started(DevicePool(factory, ["cpu"], HealthPolicy(**FAST)))
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(pool.generate(params(f"p{i}", seed=i), [])))
            await asyncio.sleep(0.01)  # fixes the arrival order
        await until(lambda: pool.queued == 3)
        assert pool.health().queued == 3 and [w.state() for w in pool.workers] == ["busy"]
        gate.set()
        results = await asyncio.gather(*tasks)
        assert pool.queued == 0
        await pool.close()
        return results

    results = asyncio.run(main())
    assert [prompt for _, prompt in factory.calls] == ["p0", "p1", "p2", "p3"]
    assert factory.max_active == 1
    assert [imgs[0].getpixel((0, 0))[1] for imgs in results] == [0, 1, 2, 3]  # each got its own answer


def test_two_devices_run_two_requests_at_once_and_never_share_one():
    factory = FakeFactory(delay_s=0.2)

    async def main() -> None:
        pool = await started(DevicePool(factory, ["dev0", "dev1"], HealthPolicy(**FAST)))
        await asyncio.gather(*(pool.generate(params(f"p{i}"), []) for i in range(4)))
        await pool.close()

    asyncio.run(main())
    assert factory.max_active == 2
    assert sorted(device for device, _ in factory.calls) == ["dev0", "dev0", "dev1", "dev1"]


def test_inference_error_is_reported_and_consecutive_failures_trigger_a_reload():
    factory = FakeFactory()

    async def main() -> None:
        pool = await started(DevicePool(factory, ["cpu"], HealthPolicy(fail_threshold=2, cooldown_s=0.3, poll_interval_s=0.02)))
        with pytest.raises(InferenceError, match="fake inference error for 'fail-1'"):
            await pool.generate(params("fail-1"), [])
        assert pool.health().disabled_gpus == []  # one failure is not enough
        with pytest.raises(InferenceError):
            await pool.generate(params("fail-2"), [])
        health = pool.health()
        assert health.disabled_gpus == [0] and "2 consecutive failures" in health.devices[0]["last_error"]
        # A request now waits for the reload (after the cooldown) and is served by the new pipeline.
        started_at = time.monotonic()
        images = await pool.generate(params("ok"), [])
        assert time.monotonic() - started_at >= 0.2
        assert images[0].getpixel((0, 0))[2] == 2  # pipeline id 2
        assert pool.health().disabled_gpus == []
        await pool.close()

    asyncio.run(main())
    assert factory.events == ["build:cpu:1", "park:1", "build:cpu:2", "discard:1"]


def test_device_fatal_error_reloads_at_once():
    assert is_device_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_fatal(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    factory = FakeFactory()

    async def main() -> None:
        pool = await started(DevicePool(factory, ["cpu"], HealthPolicy(fail_threshold=3, cooldown_s=60, poll_interval_s=0.02)))
        with pytest.raises(InferenceError, match="CUDA error"):
            await pool.generate(params("cuda crash"), [])
        assert "device-fatal" in pool.health().devices[0]["last_error"]
        images = await asyncio.wait_for(pool.generate(params("ok"), []), 5)  # no 60 s cooldown
        assert images[0].getpixel((0, 0))[2] == 2
        await pool.close()

    asyncio.run(main())


def test_failed_reload_puts_the_old_pipeline_back():
    factory = FakeFactory()

    async def main() -> None:
        pool = await started(DevicePool(factory, ["cpu"], HealthPolicy(**FAST)))
        factory.build_error = "out of memory while loading"
        with pytest.raises(InferenceError):
            await pool.generate(params("cuda crash"), [])
        await until(lambda: "restore:1" in factory.events)
        images = await pool.generate(params("ok"), [])
        assert images[0].getpixel((0, 0))[2] == 1  # still the first pipeline
        await pool.close()

    asyncio.run(main())
    assert factory.events[:4] == ["build:cpu:1", "park:1", "build-failed:cpu", "restore:1"]


def test_inference_timeout_disables_the_device_until_its_call_returns():
    factory = FakeFactory(delay_s=0.5)

    async def main() -> None:
        policy = HealthPolicy(infer_timeout_s=0.1, cooldown_s=0.05, poll_interval_s=0.02)
        pool = await started(DevicePool(factory, ["cpu"], policy))
        with pytest.raises(InferenceTimeout, match="exceeded 0.1 s; device disabled"):
            await pool.generate(params("slow"), [])
        assert pool.health().disabled_gpus == [0] and pool.workers[0].busy
        factory.delay_s = 0.0
        await pool.generate(params("after"), [])
        await pool.close()

    asyncio.run(main())
    assert factory.max_active == 1  # the reload and the next call waited for the slow thread
    assert factory.events == ["build:cpu:1", "park:1", "build:cpu:2", "discard:1"]


def test_full_queue_and_wait_timeout_answer_no_device():
    gate = threading.Event()
    factory = FakeFactory(gate=gate)

    async def main() -> None:
        pool = await started(DevicePool(factory, ["cpu"], HealthPolicy(max_queue=1, wait_timeout_s=0.3, **FAST)))
        first = asyncio.create_task(pool.generate(params("first"), []))
        await until(lambda: factory.calls)
        second = asyncio.create_task(pool.generate(params("second"), []))
        await until(lambda: pool.queued == 1)
        with pytest.raises(NoDeviceAvailable, match="queue is full"):
            await pool.generate(params("third"), [])
        with pytest.raises(NoDeviceAvailable, match="no healthy device free within 0.3 s"):
            await second
        assert pool.queued == 0
        gate.set()
        await first
        await pool.generate(params("fourth"), [])
        await pool.close()

    asyncio.run(main())
    assert [prompt for _, prompt in factory.calls] == ["first", "fourth"]


def test_a_cancelled_waiter_leaves_the_queue_without_taking_a_device():
    gate = threading.Event()
    factory = FakeFactory(gate=gate)

    async def main() -> None:
        pool = await started(DevicePool(factory, ["cpu"], HealthPolicy(**FAST)))
        first = asyncio.create_task(pool.generate(params("first"), []))
        await until(lambda: factory.calls)
        waiting = asyncio.create_task(pool.generate(params("gone"), []))
        await until(lambda: pool.queued == 1)
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert pool.queued == 0
        gate.set()
        await first
        await pool.generate(params("next"), [])
        assert not pool.workers[0].busy
        await pool.close()

    asyncio.run(main())
    assert [prompt for _, prompt in factory.calls] == ["first", "next"]


def test_health_is_unhealthy_with_the_reason_while_no_pipeline_loads():
    factory = FakeFactory(build_error="no such checkpoint")

    async def main() -> None:
        pool = DevicePool(factory, ["cpu"], HealthPolicy(cooldown_s=60, poll_interval_s=0.02))
        await pool.start()
        await until(lambda: not pool.workers[0].reloading)
        health = pool.health()
        assert health.status == "unhealthy" and "no such checkpoint" in health.reason
        await pool.close()

    asyncio.run(main())


def test_bad_pool_settings_are_refused():
    with pytest.raises(ValueError, match="at least one device"):
        DevicePool(FakeFactory(), [])
    with pytest.raises(ValueError, match="distinct"):
        DevicePool(FakeFactory(), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="infer_timeout_s must be positive"):
        HealthPolicy(infer_timeout_s=0)
