"""A loopback fake of an SGLang server (`sglang.launch_server`), with SGLang's real request and response shapes.

Endpoints: `/health`, `/get_model_info`, `/get_weight_version`, `/generate` (input_ids + image_data +
return_logprob; `meta_info` with `finish_reason`, `output_token_logprobs`, `weight_version`),
`/pause_generation`, `/continue_generation`, `/flush_cache` (400 while "requests run"),
`/update_weights_from_disk` (loads the directory's safetensors for real, so a partial or corrupt directory
fails like it would in SGLang). Every call is logged in order; faults are queued per path and consumed one
per request: "500", "timeout" (answers after the client gave up), "busy" (flush refused), "fail" (a load that
fails), "stale" (a load that succeeds but keeps the old version).

Run as `python -m tests.rollout.fake_sglang --model-path ... --port ...` it stands in for the launcher's
subprocess; `--fake-crash MSG` prints MSG to stderr and exits 3, `--fake-startup-s S` answers /health 503
for S seconds first. Imports stay light (no gsjax at module level) so the subprocess starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

IM_END_ID = 151645
REPLY_LEN = 6


@dataclass
class FakeSGLang:
    model_path: str
    weight_version: str = "default"
    timeout_sleep_s: float = 3.0
    ready_at: float = 0.0
    paused: bool = False
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    faults: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    loads: list[str] = field(default_factory=list)

    def fault(self, path: str, *kinds: str) -> None:
        self.faults[path].extend(kinds)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def reply_ids(input_ids: list[int]) -> list[int]:
    base = sum(input_ids) % 1000
    return [200 + (base + 17 * i) % 1000 for i in range(REPLY_LEN)]


def _load_checkpoint(path: str) -> str | None:
    """None when every safetensors file under `path` parses and has data; else why not."""
    from gsjax.models.safetensors_io import CheckpointReader

    directory = Path(path)
    if not (directory / "config.json").is_file():
        return f"no config.json in {path}"
    try:
        reader = CheckpointReader(directory)
        for key in reader.keys():
            reader.get(key)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def create_fake_app(state: FakeSGLang) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def log_and_inject(request: Request, call_next: Any) -> Response:
        body: dict[str, Any] = {}
        raw = await request.body()
        if raw:
            import json

            try:
                body = json.loads(raw)
            except ValueError:
                body = {"_raw": raw.decode("utf-8", "replace")}
        path = request.url.path
        state.calls.append((path.strip("/"), body))
        queue = state.faults.get(path)
        kind = queue.popleft() if queue else None
        if kind == "500":
            return JSONResponse({"object": "error", "message": "injected", "code": 500}, status_code=500)
        if kind == "timeout":
            await asyncio.sleep(state.timeout_sleep_s)
        request.state.fault = kind
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if time.monotonic() >= state.ready_at else 503)

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": state.model_path, "tokenizer_path": state.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": state.weight_version}

    @app.get("/get_weight_version")
    async def weight_version() -> dict[str, Any]:
        return {"weight_version": state.weight_version}

    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        while state.paused:  # SGLang holds new requests while paused
            await asyncio.sleep(0.01)
        ids = body.get("input_ids")
        if not isinstance(ids, list) or not ids:
            return JSONResponse({"object": "error", "message": "input_ids required", "type": "BadRequest",
                                 "param": None, "code": 400}, status_code=400)
        sp = body.get("sampling_params") or {}
        max_new = int(sp.get("max_new_tokens", 128))
        stops = sp.get("stop_token_ids") or [IM_END_ID]
        out = reply_ids(ids)[:max_new]
        finish: dict[str, Any] = {"type": "length", "length": len(out)}
        if len(out) < max_new:
            out.append(stops[0])
            finish = {"type": "stop", "matched": stops[0]}
        meta: dict[str, Any] = {"id": body.get("rid") or f"rid-{len(state.calls)}", "finish_reason": finish,
                                "prompt_tokens": len(ids), "weight_version": state.weight_version,
                                "completion_tokens": len(out), "cached_tokens": 0, "e2e_latency": 0.001}
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[-0.1 - 0.01 * i, tok, None] for i, tok in enumerate(out)]
        return JSONResponse({"text": "".join(f"<{t}>" for t in out), "output_ids": out, "meta_info": meta})

    @app.post("/pause_generation")
    async def pause() -> dict[str, Any]:
        state.paused = True
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def resume() -> dict[str, Any]:
        state.paused = False
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush(request: Request) -> PlainTextResponse:
        busy = request.state.fault == "busy"
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details.\n",
                                 status_code=400 if busy else 200)

    @app.post("/update_weights_from_disk")
    async def update(request: Request) -> JSONResponse:
        body = await request.json()
        path = body["model_path"]
        problem = "injected load failure" if request.state.fault == "fail" else _load_checkpoint(path)
        if problem is not None:
            return JSONResponse({"success": False, "message": f"Failed to update weights: {problem}. Rolling back.",
                                 "num_paused_requests": 0}, status_code=400)
        state.loads.append(path)
        state.model_path = path
        message = "Succeeded to update model weights."
        if body.get("weight_version") is not None and request.state.fault != "stale":
            state.weight_version = body["weight_version"]
            message += f" Weight version updated to {body['weight_version']}."
        return JSONResponse({"success": True, "message": message, "num_paused_requests": 0})

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fake sglang.launch_server")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--fake-crash")
    parser.add_argument("--fake-startup-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    print(f"fake sglang: model {args.model_path} tp {args.tp_size} mem {args.mem_fraction_static}", flush=True)
    if args.fake_crash:
        print(f"Traceback (most recent call last):\nRuntimeError: {args.fake_crash}", file=sys.stderr, flush=True)
        sys.exit(3)
    import uvicorn

    state = FakeSGLang(args.model_path, args.weight_version, ready_at=time.monotonic() + args.fake_startup_s)
    uvicorn.run(create_fake_app(state), host=args.host, port=args.port, log_level="warning")



@contextlib.contextmanager
def serving(state: FakeSGLang) -> Iterator[str]:
    """Serve the fake on a loopback port for the block; yields its base URL."""
    from tests.imagegen.loopback import LoopbackUvicorn

    with LoopbackUvicorn(create_fake_app(state)) as server:
        yield server.url


if __name__ == "__main__":
    main()
