"""One pipeline per device, handed to requests one at a time through a FIFO queue, with health tracking
(agent.md §6.2).

All state lives on the event loop thread and changes only in code without an `await`, so a device is
handed to exactly one request (upstream's GPU choice was racy), and waiting requests are served in arrival
order (upstream polled every 5 s, in no order). Each device runs its pipeline calls on its own single
thread. A call that outlives `infer_timeout_s` is answered with a timeout, but its device stays busy
until the thread really returns: two calls never share a device. Failures are counted per device;
`fail_threshold` consecutive ones, a timeout, or a device-fatal (CUDA) error take the device out of
service; after `cooldown_s` the maintenance task reloads it, parking the old pipeline on CPU and putting it
back into service if the new one fails to build. The first load goes through the same path (with no old
pipeline, a failed load is retried after `cooldown_s`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gsjax.imagegen.pipelines import ImageInput
from gsjax.imagegen.schema import GenerationParams, HealthResponse

log = logging.getLogger(__name__)

DEVICE_FATAL_MARKERS = (
    "cuda error",
    "device-side assert",
    "illegal memory access",
    "cublas_status",
    "cudnn_status",
    "nccl error",
    "unspecified launch failure",
    "uncorrectable ecc error",
)


class PipelineFactory(Protocol):
    """What the pool needs from a pipeline backend (`DiffusersPipelineFactory`, or a fake in tests)."""

    name: str
    image_input: ImageInput

    def build(self, device: str) -> Any: ...

    def park(self, pipe: Any) -> None: ...

    def restore(self, pipe: Any, device: str) -> None: ...

    def discard(self, pipe: Any) -> None: ...

    def generate(self, pipe: Any, device: str, params: GenerationParams, images: list[Any]) -> list[Any]: ...


@dataclass(frozen=True)
class HealthPolicy:
    """Timeouts, queue bound and health thresholds; defaults are upstream's (`GPU_*`, `INFER_TIMEOUT`) except
    `max_queue` (upstream queued without bound). `poll_interval_s` paces the reload check."""

    fail_threshold: int = 3
    cooldown_s: float = 300.0
    infer_timeout_s: float = 1800.0
    wait_timeout_s: float = 6000.0
    poll_interval_s: float = 5.0
    max_queue: int = 1024

    def __post_init__(self) -> None:
        for name in ("fail_threshold", "cooldown_s", "infer_timeout_s", "wait_timeout_s", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HealthPolicy.{name} must be positive, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"HealthPolicy.max_queue must be >= 0, got {self.max_queue}")


class NoDeviceAvailable(RuntimeError):
    """No healthy device became free within `wait_timeout_s`, or the queue is full (HTTP 503)."""


class InferenceTimeout(RuntimeError):
    """The pipeline call outlived `infer_timeout_s` (HTTP 504)."""


class InferenceError(RuntimeError):
    """The pipeline raised (HTTP 200, `success: false`)."""


def is_device_fatal(exc: BaseException) -> bool:
    """Errors after which a CUDA context is unusable until the pipeline is rebuilt (OOM is not one)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in DEVICE_FATAL_MARKERS)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class DeviceWorker:
    """One device, its pipeline, its thread and its health record."""

    index: int
    device: str
    executor: concurrent.futures.ThreadPoolExecutor
    pipeline: Any = None
    busy: bool = False
    reloading: bool = False
    needs_reload: bool = True
    disabled_until: float = 0.0
    failures: int = 0
    loads: int = 0
    last_error: str | None = None

    @property
    def servable(self) -> bool:
        return not self.busy and not self.needs_reload and self.pipeline is not None

    def state(self) -> str:
        if self.reloading:
            return "loading" if self.loads == 0 else "reloading"
        if self.needs_reload:
            return "disabled"
        return "busy" if self.busy else "ready"

    def summary(self) -> dict[str, object]:
        return {
            "index": self.index,
            "device": self.device,
            "state": self.state(),
            "failures": self.failures,
            "loads": self.loads,
            "last_error": self.last_error,
        }


@dataclass
class DevicePool:
    """The devices of one server; `generate` is the only entry point for requests."""

    factory: PipelineFactory
    devices: Sequence[str]
    policy: HealthPolicy = field(default_factory=HealthPolicy)

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("DevicePool needs at least one device")
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"DevicePool devices must be distinct, got {list(self.devices)}")
        self.workers = [
            DeviceWorker(i, dev, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"imagegen-{dev}"))
            for i, dev in enumerate(self.devices)
        ]
        self._waiters: deque[asyncio.Future[DeviceWorker]] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Begin loading every device (in the background) and start the maintenance task."""
        self._schedule_reloads()
        self._maintenance = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        """Stop maintenance and fail queued requests; running pipeline threads finish on their own."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        for task in list(self._tasks):
            task.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(NoDeviceAvailable("the server is shutting down"))
        for worker in self.workers:
            worker.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        """Requests waiting for a device."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    # ------------------------------------------------------------------ requests

    async def generate(self, params: GenerationParams, images: list[Any]) -> list[Any]:
        """Run one pipeline call on a free healthy device. Raises `NoDeviceAvailable`, `InferenceTimeout`
        or `InferenceError`."""
        worker = await self._acquire()
        call = asyncio.wrap_future(
            worker.executor.submit(self.factory.generate, worker.pipeline, worker.device, params, images)
        )
        try:
            result = await asyncio.wait_for(asyncio.shield(call), self.policy.infer_timeout_s)
        except TimeoutError:
            self._take_out(worker, f"inference timed out after {self.policy.infer_timeout_s:g} s", cooldown=True)
            call.add_done_callback(self._release_when_done(worker))
            raise InferenceTimeout(
                f"inference on {worker.device} exceeded {self.policy.infer_timeout_s:g} s; device disabled"
            ) from None
        except asyncio.CancelledError:
            call.add_done_callback(self._release_when_done(worker))
            raise
        except Exception as exc:
            self._record_failure(worker, exc)
            self._release(worker)
            raise InferenceError(describe(exc)) from exc
        worker.failures, worker.last_error = 0, None
        self._release(worker)
        return result

    async def _acquire(self) -> DeviceWorker:
        """A free healthy device, at once when nobody is queued, else in arrival order within
        `wait_timeout_s`."""
        if not self._waiters:
            worker = self._free_worker()
            if worker is not None:
                worker.busy = True
                return worker
        if self.queued >= self.policy.max_queue:
            raise NoDeviceAvailable(f"request queue is full ({self.queued} waiting, max_queue={self.policy.max_queue})")
        waiter: asyncio.Future[DeviceWorker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=self.policy.wait_timeout_s)
        except BaseException:
            self._abandon(waiter)
            raise
        if not waiter.done():
            self._abandon(waiter)
            states = ", ".join(f"{w.device}={w.state()}" for w in self.workers)
            raise NoDeviceAvailable(f"no healthy device free within {self.policy.wait_timeout_s:g} s ({states})")
        return waiter.result()

    def _free_worker(self) -> DeviceWorker | None:
        return next((w for w in self.workers if w.servable), None)

    def _dispatch(self) -> None:
        """Hand free healthy devices to the oldest waiters."""
        while self._waiters:
            worker = self._free_worker()
            if worker is None:
                return
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled or failed while queued
                continue
            worker.busy = True
            waiter.set_result(worker)

    def _abandon(self, waiter: asyncio.Future[DeviceWorker]) -> None:
        """A waiter that stops waiting: give back a device it was handed, else leave the queue."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self._release(waiter.result())
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _release(self, worker: DeviceWorker) -> None:
        worker.busy = False
        self._dispatch()

    def _release_when_done(self, worker: DeviceWorker) -> Callable[[Any], None]:
        """A done-callback that frees `worker` once its (timed-out or abandoned) call really returns."""
        return lambda _: self._release(worker)

    # ------------------------------------------------------------------ health

    def _record_failure(self, worker: DeviceWorker, exc: BaseException) -> None:
        worker.failures += 1
        worker.last_error = describe(exc)
        log.warning("inference failed on %s (%d in a row): %s", worker.device, worker.failures, worker.last_error)
        if is_device_fatal(exc):
            self._take_out(worker, f"device-fatal error: {worker.last_error}", cooldown=False)
        elif worker.failures >= self.policy.fail_threshold:
            self._take_out(worker, f"{worker.failures} consecutive failures: {worker.last_error}", cooldown=True)

    def _take_out(self, worker: DeviceWorker, reason: str, *, cooldown: bool) -> None:
        """Mark `worker` for reload, after `cooldown_s` when `cooldown`, else at the next maintenance tick."""
        worker.needs_reload = True
        worker.disabled_until = time.monotonic() + (self.policy.cooldown_s if cooldown else 0.0)
        worker.last_error = reason
        log.error("device %s taken out of service: %s", worker.device, reason)

    def health(self) -> HealthResponse:
        """Upstream's health shape, plus the queue length and per-device detail."""
        devices = [w.summary() for w in self.workers]
        if not any(w.pipeline is not None for w in self.workers):
            loading = any(w.reloading for w in self.workers)
            errors = "; ".join(f"{w.device}: {w.last_error}" for w in self.workers if w.last_error)
            reason = "loading pipeline" if loading and not errors else f"no pipeline loaded ({errors or 'not started'})"
            return HealthResponse(status="unhealthy", reason=reason, queued=self.queued, devices=devices)
        disabled = [w.index for w in self.workers if w.needs_reload]
        return HealthResponse(
            status="healthy", num_gpus=len(self.workers), disabled_gpus=disabled, queued=self.queued, devices=devices
        )

    # ------------------------------------------------------------------ reloads

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.policy.poll_interval_s)
            self._schedule_reloads()

    def _schedule_reloads(self) -> None:
        """Claim every idle device whose cooldown is over and that needs a (re)load, and reload it."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.needs_reload and not worker.busy and worker.disabled_until <= now:
                worker.busy = worker.reloading = True
                self._spawn(self._reload(worker))

    async def _reload(self, worker: DeviceWorker) -> None:
        try:
            new = await asyncio.wrap_future(worker.executor.submit(self._rebuild, worker.device, worker.pipeline))
        except Exception as exc:  # noqa: BLE001 - any load failure is recorded and retried after cooldown
            worker.last_error = f"pipeline load failed: {describe(exc)}"
            if worker.pipeline is None:
                worker.disabled_until = time.monotonic() + self.policy.cooldown_s
            else:  # the old pipeline was put back: it serves again until it fails again
                worker.needs_reload, worker.failures = False, 0
            log.error("loading the pipeline on %s failed: %s", worker.device, worker.last_error)
        else:
            worker.pipeline, worker.needs_reload, worker.failures, worker.last_error = new, False, 0, None
            worker.loads += 1
            log.info("pipeline ready on %s (load #%d)", worker.device, worker.loads)
        finally:
            worker.reloading = False
            self._release(worker)

    def _rebuild(self, device: str, old: Any) -> Any:
        """Runs on the device thread: park the old pipeline, build a new one, restore the old on failure."""
        if old is not None:
            self.factory.park(old)
        try:
            new = self.factory.build(device)
        except BaseException:
            if old is not None:
                self.factory.restore(old, device)
            raise
        if old is not None:
            self.factory.discard(old)
        return new

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
