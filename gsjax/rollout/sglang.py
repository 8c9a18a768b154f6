"""The SGLang sidecar: launch `python -m sglang.launch_server`, talk to it, and use it as a `RolloutEngine`.

Three parts, usable alone:
- `SGLangServer` starts the server as a child process in its own process group (SGLang forks scheduler and
  detokenizer workers), waits until `/health` answers, reports a crash with the tail of its log, and stops
  the whole group (SIGTERM, then SIGKILL after a grace period).
- `SGLangClient` is the synchronous control plane (health, model info, weight version, pause / flush /
  update / continue): the calls a weight sync makes from the trainer thread, outside any event loop.
- `SGLangEngine` is the data plane: `/generate` with `input_ids` + `image_data` and `return_logprob`, parsed
  into `GenerationResult`s, with bounded retries on 5xx, 429, timeouts and dropped connections. Its
  `update_weights` goes through a `WeightSyncer` (pause -> flush -> update_weights_from_disk -> continue).

Request and response shapes are SGLang's: `meta_info.output_token_logprobs` is `[[logprob, token_id, text],
...]`, `meta_info.finish_reason` is `{"type": "stop" | "length" | "abort", ...}`, and `meta_info.weight_version`
names the weights that produced the sample.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

from gsjax.httputil import BadJSONReply, json_object
from gsjax.rollout.engine import EngineError, GenerationRequest, GenerationResult, ImageInputs
from gsjax.rollout.weight_sync import VersionedDirs, WeightSyncConfig, WeightSyncer, export_model_hf

log = logging.getLogger(__name__)
T = TypeVar("T")


class SGLangHTTPError(EngineError):
    """An SGLang endpoint answered with an error status (after retries, if it was retryable)."""

    def __init__(self, what: str, status: int, body: str):
        self.status, self.body = status, body
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")


class SGLangLaunchError(EngineError):
    """The server process died or never became healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter for transient failures."""

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    request_timeout_s: float = 1800.0
    connect_timeout_s: float = 10.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2**attempt) * (0.5 + rng.random() / 2)

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.request_timeout_s, connect=self.connect_timeout_s)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, SGLangHTTPError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, (httpx.TimeoutException, httpx.TransportError))


def _final_error(what: str, exc: SGLangHTTPError | httpx.HTTPError, attempt: int,
                 max_attempts: int) -> Exception | None:
    """The error to raise for a failed attempt (an HTTP error as it came, a transport failure as an
    EngineError naming the call), or None (logged) when the failure is transient and attempts remain."""
    if _retryable(exc) and attempt + 1 < max_attempts:
        log.warning("%s failed (%s: %s); retrying", what, type(exc).__name__,
                    exc if isinstance(exc, SGLangHTTPError) else _detail(exc))
        return None
    if isinstance(exc, SGLangHTTPError):
        return exc
    return EngineError(f"{what}: {type(exc).__name__}: {_detail(exc)} (attempt {attempt + 1} of {max_attempts})")


def _detail(exc: httpx.HTTPError) -> str:
    """httpx's message (empty for the async client's read timeouts) and the request it failed on."""
    try:
        request = exc.request
    except RuntimeError:  # an exception raised without its request
        return str(exc)
    return " ".join(filter(None, (str(exc), f"on {request.method} {request.url}")))


def _checked(what: str, resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        raise SGLangHTTPError(what, resp.status_code, resp.text)
    return resp


def _json_object(what: str, resp: httpx.Response) -> dict[str, Any]:
    try:
        return json_object(resp)
    except BadJSONReply as exc:
        raise EngineError(f"{what}: {exc}") from None


# --------------------------------------------------------------------------- control plane


class SGLangClient:
    """Synchronous calls to SGLang's management endpoints (also served by gsjax's own policy server)."""

    def __init__(self, base_url: str, retry: RetryPolicy | None = None, control_timeout_s: float = 600.0,
                 transport: httpx.BaseTransport | None = None, rng: random.Random | None = None):
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self.http = httpx.Client(base_url=self.base_url, transport=transport,
                                 timeout=httpx.Timeout(control_timeout_s, connect=self.retry.connect_timeout_s))

    def _call(self, what: str, attempt: Callable[[], httpx.Response], allow: Collection[int] = ()) -> httpx.Response:
        """`attempt()` with retries on transient failures; a status in `allow` is returned, not raised."""
        for n in range(self.retry.max_attempts):
            try:
                resp = attempt()
                return resp if resp.status_code in allow else _checked(what, resp)
            except (SGLangHTTPError, httpx.HTTPError) as exc:
                if (final := _final_error(what, exc, n, self.retry.max_attempts)) is not None:
                    raise final from None
                time.sleep(self.retry.delay(n, self.rng))
        raise AssertionError("unreachable")

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """One probe of `/health`, no retries: True on 200."""
        try:
            return self.http.get("/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def model_info(self) -> dict[str, Any]:
        return _json_object("get_model_info", self._call("get_model_info", lambda: self.http.get("/get_model_info")))

    def weight_version(self) -> str:
        """The served version: `/get_weight_version`, or `/get_model_info` on servers without it."""
        resp = self._call("get_weight_version", lambda: self.http.get("/get_weight_version"), allow=(404,))
        data = self.model_info() if resp.status_code == 404 else _json_object("get_weight_version", resp)
        version = data.get("weight_version")
        if not isinstance(version, str):
            raise EngineError(f"server reports no weight_version: {data}")
        return version

    def pause_generation(self, mode: str = "abort") -> None:
        self._call("pause_generation", lambda: self.http.post("/pause_generation", json={"mode": mode}))

    def continue_generation(self) -> None:
        self._call("continue_generation", lambda: self.http.post("/continue_generation", json={}))

    def flush_cache(self) -> bool:
        """True when flushed. SGLang answers 400 while requests are still running: worth retrying later."""
        resp = self._call("flush_cache", lambda: self.http.post("/flush_cache"), allow=(400,))
        return resp.status_code == 200

    def update_weights_from_disk(self, model_path: str, weight_version: str,
                                 load_format: str | None = None) -> tuple[bool, str]:
        """(success, message). A 400 is the server's "could not load" answer, not an exception."""
        body: dict[str, Any] = {"model_path": model_path, "weight_version": weight_version}
        if load_format is not None:
            body["load_format"] = load_format
        resp = self._call("update_weights_from_disk", lambda: self.http.post("/update_weights_from_disk", json=body),
                          allow=(400,))
        data = _json_object("update_weights_from_disk", resp)
        return bool(data.get("success")) and resp.status_code == 200, str(data.get("message", ""))

    def close(self) -> None:
        self.http.close()


# --------------------------------------------------------------------------- process


@dataclass(frozen=True)
class SGLangLaunchConfig:
    """How to start the server. `module` and `python` are swappable so tests can launch a fake."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    mem_fraction_static: float | None = None
    weight_version: str | None = None
    extra_args: tuple[str, ...] = ()
    python: str = sys.executable
    module: str = "sglang.launch_server"
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    log_path: str | None = None
    startup_timeout_s: float = 1200.0
    poll_interval_s: float = 1.0
    stop_timeout_s: float = 30.0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", self.module, "--model-path", self.model_path, "--host", self.host,
               "--port", str(self.port), "--tp-size", str(self.tp_size)]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.weight_version is not None:
            cmd += ["--weight-version", self.weight_version]
        return cmd + list(self.extra_args)


def tail_lines(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a (possibly huge) log file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class SGLangServer:
    """One SGLang server process: `with SGLangServer(cfg) as server:` starts it healthy and stops it after."""

    def __init__(self, config: SGLangLaunchConfig):
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        if config.log_path:
            self.log_path = Path(config.log_path)
        else:
            fd, name = tempfile.mkstemp(prefix="sglang-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)

    @property
    def url(self) -> str:
        return self.config.url

    def start(self) -> Self:
        if self.process is not None:
            raise EngineError("this SGLang server was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.config.command()
        log.info("starting SGLang: %s (log: %s)", " ".join(cmd), self.log_path)
        with open(self.log_path, "ab") as logfile:
            self.process = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=self.config.cwd, env={**os.environ, **self.config.env},
                                            start_new_session=True)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        """Raise `SGLangLaunchError` with the log tail if the process has exited."""
        if self.process is None:
            raise SGLangLaunchError("the SGLang server was never started")
        code = self.process.poll()
        if code is not None:
            raise SGLangLaunchError(f"SGLang server exited with code {code}; last log lines:\n"
                                    f"{tail_lines(self.log_path)}")

    def wait_healthy(self) -> None:
        client = SGLangClient(self.url)
        try:
            deadline = time.monotonic() + self.config.startup_timeout_s
            while True:
                self.check_alive()
                if client.healthy(timeout_s=max(1.0, self.config.poll_interval_s)):
                    return
                if time.monotonic() > deadline:
                    raise SGLangLaunchError(
                        f"SGLang server at {self.url} not healthy after {self.config.startup_timeout_s} s; "
                        f"last log lines:\n{tail_lines(self.log_path)}")
                time.sleep(self.config.poll_interval_s)
        finally:
            client.close()

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL it after `stop_timeout_s`; the exit code (None if never run)."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("SGLang server %d ignored SIGTERM for %s s; killing it", proc.pid,
                            self.config.stop_timeout_s)
                self._signal_group(signal.SIGKILL)
                proc.wait()
        self._signal_group(signal.SIGKILL)  # workers the server forked may outlive their parent
        return proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)  # our own group: start_new_session made the child its leader
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- data plane


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return "image/jpeg"


def data_urls(images: ImageInputs | None) -> list[str]:
    """SGLang's `image_data`: each image as a data URL. SGLang preprocesses the files itself, so an
    `ImageInputs` without its encoded files cannot be sent."""
    if images is None:
        return []
    n = len(images.image_grid_thw)
    if len(images.encoded) != n:
        raise EngineError(f"SGLang needs the encoded image files: got {len(images.encoded)} for {n} images")
    return [f"data:{_mime(b)};base64,{base64.b64encode(b).decode('ascii')}" for b in images.encoded]


def generate_payload(request: GenerationRequest) -> dict[str, Any]:
    p = request.params
    sampling: dict[str, Any] = {"max_new_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                                "top_k": p.top_k, "stop_token_ids": list(p.stop_token_ids), "no_stop_trim": True,
                                "skip_special_tokens": False}
    if p.seed is not None:
        sampling["sampling_seed"] = p.seed
    payload: dict[str, Any] = {"input_ids": list(request.input_ids), "sampling_params": sampling,
                               "return_logprob": True}
    urls = data_urls(request.images)
    if urls:
        payload["image_data"] = urls
    return payload


_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def parse_generate(data: dict[str, Any], request: GenerationRequest, fallback_version: str) -> GenerationResult:
    """SGLang's `/generate` reply -> `GenerationResult`; anything malformed is an `EngineError`."""
    meta = data.get("meta_info")
    if not isinstance(meta, dict):
        raise EngineError(f"/generate reply has no meta_info: {str(data)[:200]}")
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in _FINISH:
        raise EngineError(f"/generate reply has an unknown finish_reason {finish!r}")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise EngineError("/generate reply has no meta_info.output_token_logprobs (return_logprob ignored?)")
    try:
        logprobs = tuple(float(e[0]) for e in entries)
        ids = tuple(int(e[1]) for e in entries)
    except (TypeError, ValueError, IndexError):
        raise EngineError(f"malformed output_token_logprobs: {str(entries)[:200]}") from None
    extra: dict[str, Any] = {"sglang_id": meta.get("id"), "cached_tokens": meta.get("cached_tokens", 0)}
    if isinstance(finish, dict):
        extra["finish"] = finish
        if kind == "abort":
            extra["message"] = finish.get("message", "")
    output_ids = data.get("output_ids")
    if isinstance(output_ids, list) and [int(i) for i in output_ids] != list(ids):
        extra["output_ids_mismatch"] = True  # the logprob entries are what was sampled; keep them
    prompt_tokens = int(meta.get("prompt_tokens", len(request.input_ids)))
    if prompt_tokens != len(request.input_ids):
        extra["sent_prompt_tokens"] = len(request.input_ids)
    version = meta.get("weight_version")
    return GenerationResult(request_id=request.request_id, output_ids=ids, logprobs=logprobs,
                            finish_reason=_FINISH[kind], weight_version=str(version or fallback_version),
                            prompt_tokens=prompt_tokens, extra=extra)


class SGLangEngine:
    """`RolloutEngine` over a running SGLang server (optionally one this object launched and owns).

    Weight updates: `update_weights(path_to_hf_dir, version)` loads that directory as is; any other `params`
    goes through `exporter(params, directory)` into a new versioned directory under `weights_root` (written
    atomically, old ones pruned to `keep`), then the syncer's pause -> flush -> update -> verify -> continue."""

    def __init__(self, base_url: str, *, retry: RetryPolicy | None = None, weights_root: str | Path | None = None,
                 sync: WeightSyncConfig | None = None, initial_model_path: str | None = None,
                 exporter: Callable[[Any, Path], Any] = export_model_hf, server: SGLangServer | None = None,
                 rng: random.Random | None = None):
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self.control = SGLangClient(self.base_url, self.retry, rng=self.rng)
        self.server = server
        self.exporter = exporter
        self._version: str | None = None
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}
        dirs = VersionedDirs(weights_root, keep=(sync or WeightSyncConfig()).keep) if weights_root else None
        self.syncer = WeightSyncer(self.control, dirs, sync, last_good=None)
        self._initial_model_path = initial_model_path

    @classmethod
    def launch(cls, config: SGLangLaunchConfig, **kwargs: Any) -> SGLangEngine:
        """Start a server for `config` and return an engine that stops it on `close()`."""
        server = SGLangServer(config).start()
        try:
            return cls(config.url, server=server, initial_model_path=config.model_path, **kwargs)
        except BaseException:
            server.stop()
            raise

    # ---------------------------------------------------------------- RolloutEngine

    @property
    def weight_version(self) -> str:
        if self._version is None:
            self._version = self.control.weight_version()
            if self.syncer.last_good is None and self._initial_model_path:
                self.syncer.last_good = (self._version, Path(self._initial_model_path))
        return self._version

    def _client(self) -> httpx.AsyncClient:
        """One async client per event loop: a client's connections belong to the loop that opened them."""
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, httpx.AsyncClient(base_url=self.base_url, timeout=self.retry.timeout()))
            self._clients[id(loop)] = entry
        return entry[1]

    async def _with_retries(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        for n in range(self.retry.max_attempts):
            try:
                return await attempt()
            except (SGLangHTTPError, httpx.HTTPError) as exc:
                if (final := _final_error(what, exc, n, self.retry.max_attempts)) is not None:
                    raise final from None
                await asyncio.sleep(self.retry.delay(n, self.rng))
        raise AssertionError("unreachable")

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        payload = generate_payload(request)
        client = self._client()

        async def attempt() -> dict[str, Any]:
            resp = _checked("/generate", await client.post("/generate", json=payload))
            return _json_object("/generate", resp)

        data = await self._with_retries(f"/generate {request.request_id}".rstrip(), attempt)
        result = parse_generate(data, request, self._version or "")
        if result.weight_version:
            self._version = result.weight_version
        return result

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    def update_weights(self, params: Any, version: str) -> None:
        """Sync new weights into the server; raises `WeightSyncError` (after rolling back) on failure."""
        _ = self.weight_version  # learn the served version (and the launch directory as last good) first
        if isinstance(params, (str, Path)):
            self.syncer.sync_dir(version, Path(params))
        else:
            self.syncer.publish(version, lambda directory: self.exporter(params, directory))
        self._version = version

    def close(self) -> None:
        for loop, client in self._clients.values():
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(client.aclose())
        self._clients.clear()
        self.control.close()
        if self.server is not None:
            self.server.stop()
