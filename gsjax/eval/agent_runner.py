"""gsjax's own agent as the evaluation's `EpisodeRunner` (the default of `gsjax eval knowgen|wise run`).

`run_stage` calls runners from a thread pool; the agent is async and its HTTP clients, tool
semaphores and cache belong to one event loop. So the runner owns one background loop thread:
every worker thread submits its episode there with `run_coroutine_threadsafe` and blocks on the
answer, and all episodes share one policy client and one tool set (connection pools, per-tool
limits, the local corpus loaded once). Configuration comes from a YAML/JSON file over the
environment and the upstream defaults; API keys come only from environment variables, so a
config file can be committed and recorded beside the results.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gsjax.agent.build import AgentParts, open_agent, tool_cache
from gsjax.agent.config import (
    CACHE_MODES,
    AgentConfig,
    PolicyConfig,
    Secret,
    ToolsConfig,
    agent_config_from_env,
    policy_config_from_env,
    public_dict,
    tools_config_from_env,
)
from gsjax.agent.loop import EpisodeResult, Task, episode_dir_name, run_episode
from gsjax.errors import InputError
from gsjax.eval.knowgen import EpisodeOutcome
from gsjax.eval.records import BenchmarkItem
from gsjax.fileio import atomic_write_text

log = logging.getLogger("gsjax.eval.agent")

TOP_LEVEL_KEYS = ("policy", "agent", "tools", "cache", "episode_retries", "episodes_dir")
# Secret field -> (environment variable read by default, value when unset); the file may only rename the variable.
SECRET_ENVS: dict[str, dict[str, tuple[str, str]]] = {
    "policy": {"api_key": ("GSJAX_POLICY_API_KEY", "EMPTY")},
    "tools": {"serper_key": ("SERPER_KEY_ID", ""), "jina_keys": ("JINA_API_KEYS", ""),
              "summary_api_key": ("BROWSE_SUMMARY_API_KEY", "EMPTY")},
}


class AgentConfigError(InputError, ValueError):
    """A setting of the agent evaluation config is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class AgentRunConfig:
    """Everything one evaluation run of the agent needs (secrets only as `Secret`s read from env)."""

    agent: AgentConfig
    policy: PolicyConfig
    tools: ToolsConfig
    cache_dir: Path | None = None
    cache_mode: str = "off"
    episode_retries: int = 2  # spec training_and_eval.md §7.2: episode retry limit 2
    episodes_dir: Path | None = None  # default: <run out>/episodes


# ---------------------------------------------------------------- config file


def _coerce(value: Any, default: Any, where: str) -> Any:
    """`value` checked against the type of the setting's current value (YAML dates become ISO strings)."""
    if isinstance(default, Secret):
        raise AgentConfigError(f"{where}: API keys are read from environment variables only; "
                               f"name the variable with {where.rsplit('.', 1)[-1]}_env")
    if dataclasses.is_dataclass(default):
        if not isinstance(value, Mapping):
            raise AgentConfigError(f"{where}: expected a mapping, got {value!r}")
        return _apply(default, value, where)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        if isinstance(value, _dt.date):
            value = value.isoformat()
        ok = isinstance(value, str)
    if not ok:
        raise AgentConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def _apply(base: Any, raw: Mapping[str, Any], where: str) -> Any:
    """`base` (a config dataclass) with the file's settings applied; unknown keys are errors."""
    names = [f.name for f in dataclasses.fields(base)]
    changes = {}
    for key, value in raw.items():
        if key not in names:
            raise AgentConfigError(f"{where}.{key}: unknown setting (known: {', '.join(names)})")
        changes[key] = _coerce(value, getattr(base, key), f"{where}.{key}")
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as exc:
        raise AgentConfigError(f"{where}: {exc}") from None


def _section(raw: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    section = raw.get(name) or {}
    if not isinstance(section, Mapping):
        raise AgentConfigError(f"{where}{name}: expected a mapping, got {section!r}")
    return dict(section)


def _secrets(section: dict[str, Any], name: str, env: Mapping[str, str], where: str) -> dict[str, Secret]:
    """Pop `<field>_env` entries from `section`; each Secret field is read from its (renamed) variable."""
    secrets = {}
    for field, (default_var, unset) in SECRET_ENVS.get(name, {}).items():
        var = section.pop(f"{field}_env", default_var)
        if not isinstance(var, str) or not var:
            raise AgentConfigError(f"{where}{name}.{field}_env: expected an environment variable name, got {var!r}")
        secrets[field] = Secret(env.get(var) or unset)
    return secrets


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise AgentConfigError(f"{path}: cannot read the agent config: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise AgentConfigError(f"{path}: the agent config must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise AgentConfigError(f"{path}: unknown top-level key(s) {unknown} (known: {', '.join(TOP_LEVEL_KEYS)})")
    return dict(raw)


def load_run_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> AgentRunConfig:
    """Defaults < environment (the `gsjax agent run` variables) < the file; keys only from env."""
    env = os.environ if env is None else env
    raw = _read_file(Path(path)) if path else {}
    where = f"{path}: " if path else ""
    built: dict[str, Any] = {}
    for name, from_env in (("agent", agent_config_from_env), ("policy", policy_config_from_env),
                           ("tools", tools_config_from_env)):
        section = _section(raw, name, where)
        secrets = _secrets(section, name, env, where)
        built[name] = dataclasses.replace(_apply(from_env(env), section, f"{where}{name}"), **secrets)
    cache = _section(raw, "cache", where)
    unknown = sorted(set(cache) - {"dir", "mode"})
    if unknown:
        raise AgentConfigError(f"{where}cache: unknown key(s) {unknown} (known: dir, mode)")
    cache_dir = Path(str(cache["dir"])).expanduser() if cache.get("dir") else None
    mode = cache.get("mode")
    mode = "off" if mode is False else mode or ("replay-or-record" if cache_dir else "off")  # YAML reads `off` as False
    if mode not in CACHE_MODES:
        raise AgentConfigError(f"{where}cache.mode: {mode!r} is not one of {', '.join(CACHE_MODES)}")
    if mode != "off" and cache_dir is None:
        raise AgentConfigError(f"{where}cache.mode {mode} needs cache.dir")
    retries = raw.get("episode_retries", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise AgentConfigError(f"{where}episode_retries: expected an integer >= 0, got {retries!r}")
    episodes = raw.get("episodes_dir")
    return AgentRunConfig(cache_dir=cache_dir, cache_mode=mode, episode_retries=retries,
                          episodes_dir=Path(str(episodes)).expanduser() if episodes else None, **built)


def check_credentials(cfg: AgentRunConfig) -> None:
    """Refuse a web run without a Serper key (every search would fail and the scores would mean
    nothing); only warn about Jina, whose absence costs the browse tool alone."""
    if cfg.tools.backend != "serper" or cfg.cache_mode == "replay":
        return
    if not cfg.tools.serper_key:
        raise AgentConfigError("tools.backend is serper but the Serper key is empty: export SERPER_KEY_ID "
                               "(or the variable named by tools.serper_key_env), or use tools.backend: local")
    if not cfg.tools.jina_keys:
        log.warning("no Jina key (JINA_API_KEYS): every browse call will fail")


# ---------------------------------------------------------------- episodes -> outcomes


def episode_outcome(result: EpisodeResult) -> EpisodeOutcome:
    """The evaluation's view of an episode; any termination but `answer` is a recorded failure."""
    messages = [{"role": m.role, "content": m.text, "images": [i.path for i in m.images]} for m in result.messages]
    prediction = result.prediction
    if result.termination == "answer":
        return EpisodeOutcome("answer", str(prediction.get("gen_prompt") or ""),
                              list(prediction.get("reference_images") or []), messages)
    reason = str(prediction.get("error") or "no answer")
    error = reason if reason.startswith(result.termination) else f"{result.termination}: {reason}"
    return EpisodeOutcome(result.termination, messages=messages, error=error)


def free_attempt(episodes_dir: Path, task_id: str) -> int:
    """First attempt index without a folder, so a rerun of a failed sample keeps the earlier attempts."""
    index = 0
    while (episodes_dir / episode_dir_name(task_id, index)).exists():
        index += 1
    return index


class AgentEpisodeRunner:
    """`EpisodeRunner` over `run_episode`, safe to call from many threads at once.

    Optional lifecycle used by the eval CLI: `set_output_dir(out)` before the stage (episode folders
    go to `<out>/episodes/<id>_<attempt>/`), and `with runner:` / `close()` around it."""

    def __init__(self, cfg: AgentRunConfig,
                 open_parts: Callable[[], AbstractAsyncContextManager[AgentParts]] | None = None) -> None:
        self.cfg = cfg
        self.episodes_dir = cfg.episodes_dir
        self._open_parts = open_parts or (lambda: open_agent(cfg.policy, cfg.tools,
                                                             tool_cache(cfg.cache_dir, cfg.cache_mode)))
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stack: AsyncExitStack | None = None
        self._parts: AgentParts | None = None

    def set_output_dir(self, out_dir: Path) -> None:
        """Episodes under `<out>/episodes` (unless the config names a folder); the config, keys
        masked, to `<out>/agent_config.json` so the run records what produced it."""
        out_dir = Path(out_dir)
        if self.cfg.episodes_dir is None:
            self.episodes_dir = out_dir / "episodes"
        atomic_write_text(out_dir / "agent_config.json",
                          json.dumps(public_dict(self.cfg), indent=1, default=str) + "\n")

    # ------------------------------------------------------------ loop lifecycle

    def start(self) -> None:
        """Start the loop thread and open the policy client and tools (idempotent; errors raise here)."""
        with self._lock:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="gsjax-agent-loop", daemon=True)
            thread.start()
            try:
                asyncio.run_coroutine_threadsafe(self._open(), loop).result()
            except BaseException:
                _stop(loop, thread)
                raise
            self._loop, self._thread = loop, thread

    async def _open(self) -> None:
        self._stack = AsyncExitStack()
        self._parts = await self._stack.enter_async_context(self._open_parts())

    def close(self) -> None:
        """Cancel episodes still in flight (their callers get an error), close the clients, stop the loop."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()
        finally:
            _stop(loop, thread)

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        stack, self._stack, self._parts = self._stack, None, None
        if stack is not None:
            await stack.aclose()
        await asyncio.get_running_loop().shutdown_default_executor()

    def __enter__(self) -> AgentEpisodeRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ episodes

    def __call__(self, task: BenchmarkItem) -> EpisodeOutcome:
        if self.episodes_dir is None:
            raise RuntimeError("AgentEpisodeRunner has no episode folder: call set_output_dir(out) first "
                               "or set episodes_dir in the agent config")
        self.start()
        loop = self._loop
        if loop is None:
            raise RuntimeError("AgentEpisodeRunner was closed while this episode was starting")
        return asyncio.run_coroutine_threadsafe(self._episode(task, self.episodes_dir), loop).result()

    async def _episode(self, item: BenchmarkItem, episodes_dir: Path) -> EpisodeOutcome:
        """Up to 1 + episode_retries attempts while the episode ends in `error` (infrastructure:
        policy server or cache); a model that fails to answer is an outcome, not retried here."""
        assert self._parts is not None
        first = await asyncio.to_thread(free_attempt, episodes_dir, item.key)
        for attempt in range(first, first + self.cfg.episode_retries + 1):
            task = Task(prompt=item.prompt, task_id=item.key, rollout_index=attempt,
                        meta={"benchmark_id": item.id, **item.meta})
            result = await run_episode(task, self._parts.policy, self._parts.tools, self.cfg.agent, episodes_dir)
            if result.termination != "error":
                break
            log.warning("sample %s attempt %d ended in error: %s", item.key, attempt, result.prediction.get("error"))
        return episode_outcome(result)


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def agent_runner(config_path: str | None = None) -> AgentEpisodeRunner:
    """The `--runner` factory: gsjax's agent from a YAML/JSON config (None: environment + defaults)."""
    cfg = load_run_config(config_path)
    check_credentials(cfg)
    return AgentEpisodeRunner(cfg)


__all__ = ["AgentConfigError", "AgentEpisodeRunner", "AgentRunConfig", "agent_runner", "check_credentials",
           "episode_outcome", "load_run_config"]
