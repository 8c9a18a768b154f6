"""`serve-policy` as the top-level CLI mounts it: options checked before anything heavy loads, `--engine
module:factory` builds the engine, and the built app serves it."""

from __future__ import annotations

import asyncio

import httpx
import typer
from typer.testing import CliRunner

from gsjax.rollout.cli import build_app, build_engine, serve_policy
from tests.rollout.fakes import FakeEngine

app = typer.Typer()
app.command("serve-policy")(serve_policy)
app.command("other")(lambda: None)  # two commands, so `serve-policy` is addressed by name as in gsjax


def run(*args: str):
    return CliRunner().invoke(app, ["serve-policy", *args], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})


def test_help_and_bad_invocations_fail_before_loading_anything(tmp_path):
    help_text = run("--help").output
    for option in ("CKPT_OR_HF_DIR", "--host", "--port", "--engine", "--max-total-len", "--weight-version"):
        assert option in help_text
    assert run(str(tmp_path / "missing")).exit_code == 2
    no_config = run(str(tmp_path))
    assert no_config.exit_code == 2 and "has no config.json" in no_config.output
    bad_spec = run(str(tmp_path), "--engine", "nocolon")
    assert bad_spec.exit_code == 2 and "expected module:factory" in bad_spec.output
    missing = run(str(tmp_path), "--engine", "tests.rollout.fakes:no_such_factory")
    assert missing.exit_code == 2 and "cannot load" in missing.output
    not_engine = run(str(tmp_path), "--engine", "builtins:str")
    assert not_engine.exit_code == 2 and "returned str, not a RolloutEngine" in not_engine.output
    lengths = run(str(tmp_path), "--default-max-tokens", "9000", "--max-total-len", "8192")
    assert lengths.exit_code == 2 and "--default-max-tokens" in lengths.output


def test_an_engine_factory_is_built_and_served(tmp_path, qwen_tokenizer):
    engine = build_engine(tmp_path, "tests.rollout.fakes:fake_engine_factory", max_slots=4, max_total_len=2048,
                          weight_version="0")
    assert isinstance(engine, FakeEngine) and engine.weight_version == f"loaded:{tmp_path.name}"
    served = build_app(engine, tmp_path, model_name="tiny", max_context_tokens=2048, default_max_tokens=64,
                       tokenizer=qwen_tokenizer)

    async def main() -> tuple[dict, dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served), base_url="http://p") as client:
            models = (await client.get("/v1/models")).json()
            chat = (await client.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "hi"}]})).json()
            return models, chat

    models, chat = asyncio.run(main())
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 2048
    assert chat["choices"][0]["finish_reason"] == "stop" and engine.requests[0].params.max_tokens == 64
