"""`SGLangServer` launching a fake `sglang.launch_server` (tests.rollout.fake_sglang) as a real subprocess:
waits for health, stops cleanly, reports crashes and slow starts with the log tail. Plus the real-SGLang
check, GPU-only."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from gsjax.processing.tokens import IM_END_ID
from gsjax.rollout.engine import GenerationRequest, SamplingParams
from gsjax.rollout.sglang import SGLangClient, SGLangEngine, SGLangLaunchConfig, SGLangLaunchError, SGLangServer
from tests.rollout.fakes import write_hf_dir

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_config(tmp_path: Path, *extra: str, timeout_s: float = 60.0) -> SGLangLaunchConfig:
    return SGLangLaunchConfig(model_path=str(write_hf_dir(tmp_path / "model")), port=free_port(), tp_size=2,
                              mem_fraction_static=0.7, weight_version="w0", extra_args=tuple(extra),
                              module="tests.rollout.fake_sglang", cwd=str(REPO),
                              env={"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
                              log_path=str(tmp_path / "sglang.log"), startup_timeout_s=timeout_s,
                              poll_interval_s=0.1, stop_timeout_s=10.0)


def test_command_line_has_sglangs_flags(tmp_path):
    cfg = SGLangLaunchConfig(model_path="/m", port=1234, tp_size=4, mem_fraction_static=0.8, weight_version="v3",
                             extra_args=("--context-length", "40960"), python="python3")
    assert cfg.command() == ["python3", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1",
                             "--port", "1234", "--tp-size", "4", "--mem-fraction-static", "0.8",
                             "--weight-version", "v3", "--context-length", "40960"]
    assert SGLangLaunchConfig(model_path="/m", host="0.0.0.0", port=9).url == "http://127.0.0.1:9"


def test_launch_waits_for_health_serves_and_stops_cleanly(tmp_path):
    cfg = fake_config(tmp_path, "--fake-startup-s", "0.5")
    engine = SGLangEngine.launch(cfg)
    server = engine.server
    assert server is not None and server.process is not None and server.process.poll() is None
    assert SGLangClient(cfg.url).healthy() and engine.weight_version == "w0"

    async def one() -> tuple:
        result = await engine.generate(GenerationRequest((1, 2, 3), SamplingParams(stop_token_ids=(IM_END_ID,))))
        return result.output_ids, result.finish_reason

    ids, finish = asyncio.run(one())
    assert finish == "stop" and ids[-1] == IM_END_ID
    started = time.monotonic()
    engine.close()
    # stopped by SIGTERM (uvicorn shuts down gracefully, then re-raises the signal), never by the SIGKILL fallback
    assert server.process.poll() in (0, -signal.SIGTERM) and time.monotonic() - started < cfg.stop_timeout_s
    assert not SGLangClient(cfg.url).healthy(timeout_s=0.5)
    assert "tp 2 mem 0.7" in Path(cfg.log_path).read_text()


def test_a_crash_at_startup_is_reported_with_the_log_tail(tmp_path):
    cfg = fake_config(tmp_path, "--fake-crash", "CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(SGLangLaunchError) as info:
        SGLangServer(cfg).start()
    message = str(info.value)
    assert "exited with code 3" in message and "CUDA out of memory" in message


def test_a_server_that_never_gets_healthy_is_stopped(tmp_path):
    server = SGLangServer(fake_config(tmp_path, "--fake-startup-s", "60", timeout_s=1.5))
    with pytest.raises(SGLangLaunchError, match="not healthy after 1.5 s"):
        server.start()
    assert server.process is not None and server.process.poll() is not None


@pytest.mark.gpu
def test_real_sglang_generates_and_syncs_weights(tmp_path):
    """Needs the sglang package, a GPU and GSJAX_SGLANG_MODEL (an HF Qwen3-VL directory)."""
    pytest.importorskip("sglang")
    model = os.environ.get("GSJAX_SGLANG_MODEL")
    if not model:
        pytest.skip("set GSJAX_SGLANG_MODEL to an HF Qwen3-VL checkpoint directory")
    cfg = SGLangLaunchConfig(model_path=model, port=free_port(), mem_fraction_static=0.6, weight_version="v0",
                             python=sys.executable, log_path=str(tmp_path / "sglang.log"))
    engine = SGLangEngine.launch(cfg, weights_root=tmp_path / "weights")
    try:
        request = GenerationRequest((151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198),
                                    SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(IM_END_ID,)))
        first = asyncio.run(engine.generate(request))
        assert first.output_ids and len(first.logprobs) == len(first.output_ids) and first.weight_version == "v0"
        engine.update_weights(model, "v1")  # same weights, new version: the full pause/flush/update/continue path
        again = asyncio.run(engine.generate(request))
        assert again.weight_version == "v1" and again.output_ids == first.output_ids  # greedy, same weights
    finally:
        engine.close()
