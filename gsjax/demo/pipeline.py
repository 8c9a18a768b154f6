"""`gsjax demo`: both stages of the paper on a tiny Qwen3-VL, offline, on a CPU, resumable.

Stages, each recorded in `<workdir>/demo_state.json` when it finishes:

1. trajectories: scripted agent episodes over the offline corpus -> ShareGPT SFT records, plus RL tasks;
2. sft: `run_sft` on them (checkpoints under `sft/checkpoints`, HF export to `sft/hf`);
3. grpo: `run_grpo` from the SFT export, episodes on the embedded JAX sampler with the offline tools,
   rewards from the image server (a child process over a tiny random diffusers pipeline) and the
   OFFLINE HEURISTIC judge (checkpoints under `grpo/checkpoints`);
4. report: `report/report.md` + `report/curves.png` + example trajectories with their images.

A second run skips finished stages and resumes an unfinished one from its last checkpoint (SFT and GRPO
resume by themselves); the report is always rewritten. The image server is stopped on every exit,
Ctrl-C included, and checkpoints are written atomically, so an interrupted run is always resumable.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from gsjax.demo.context import STAGES, DemoConfig, DemoContext, DemoState, Layout
from gsjax.demo.generation import RecordingGenerator, image_client
from gsjax.demo.interrupts import interruptible
from gsjax.demo.report import StageRow
from gsjax.demo.services import ImageServer, ensure_tiny_pipeline
from gsjax.demo.summary import build_report
from gsjax.demo.trajectories import demo_agent_config, demo_tools_config, write_rl_tasks, write_sft_trajectories
from gsjax.fileio import atomic_write_text

if TYPE_CHECKING:
    from gsjax.train.config import SFTConfig
    from gsjax.train.grpo_config import GRPOConfig

Hook = Callable[[str, DemoContext], None]

# Query block of the CPU attention kernel: 256 compiles an SFT step in 8.9 s instead of 12.7 (a 1408-token step
# runs in the same 0.31-0.37 s), and the 2048-token GRPO update likewise.
ATTENTION_CHUNK = 256


@dataclass(frozen=True)
class DemoResult:
    report: Path
    stages: list[StageRow]
    seconds: float


# --------------------------------------------------------------------------- configs of the two trainers


def batch_shards() -> int:
    """Rows per SFT batch: one per device (fsdp over all of them), the fewest the learner accepts."""
    import jax

    return jax.device_count()


def sft_config(cfg: DemoConfig, layout: Layout, records: int) -> SFTConfig:
    """The SFT recipe of the demo: tiny preset, one length bucket (every record fits 1280 tokens with the compact
    system prompt), one vision-row bucket, checkpoints every 50 steps (each costs about one step).

    A run is bitwise reproducible on one machine for one seed, wherever its work folder lies: the policy reads
    image paths relative to its episode folder. Before that, the folder's name was in every image-search
    result, so runs in /tmp/d6 and /tmp/d7 trained on other tokens and ended at last-50 losses of 0.042 to
    0.069 with 18 to 42 of 48 GRPO episodes reaching a parsed answer (which we had put down to XLA float
    noise), and the RL rollouts showed paths SFT never did. Since then (2026-12-05), seeds 0, 1 and 2: last-50
    losses 0.064 / 0.073 / 0.077, 46 / 47 / 44 of 48 GRPO episodes answer. Misses start with a garbled
    subject name in the first turn (the RL prompts use a wording SFT never showed).

    The learning rate warms up over the first 10 % of the steps. With a one-step warmup the tiny model
    sometimes settled into repeating tool-call tags and JSON keys."""
    from gsjax.train.config import SFTConfig

    batch = batch_shards()
    epochs = math.ceil(cfg.sft_steps * batch / max(records, 1)) + 1
    raw = {
        "model": {"preset": cfg.model_preset, "dtype": "float32", "param_dtype": "float32",
                  "attention_chunk": ATTENTION_CHUNK},
        "mesh": {"data": 1, "fsdp": -1},
        "optim": {"lr": cfg.sft_lr, "weight_decay": 0.0, "schedule": "cosine", "warmup_ratio": 0.1,
                  "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "train": {"steps": cfg.sft_steps, "seed": cfg.seed, "log_every": 1, "checkpoint_every": 50,
                  "keep_checkpoints": 1, "out_dir": str(layout.sft), "export_hf_at_end": True,
                  "tensorboard": False, "logits_chunk": 0,  # the head runs at the trained positions only
                  "compile_cache_dir": str(layout.compile_cache)},
        "data": {"path": str(layout.data / "sft.jsonl"), "image_root": str(layout.data), "batch_size": batch,
                 "buckets": [cfg.sft_seq_len], "cutoff_len": cfg.sft_seq_len, "max_pixels": 65536,
                 "min_pixels": 65536, "num_epochs": epochs, "seed": cfg.seed, "vision_row_buckets": [512]},
    }
    return SFTConfig.from_dict(raw)


def loss_position_buckets(cfg: DemoConfig) -> list[int]:
    """Head sizes of the GRPO update: most episodes sample under 384 tokens, none more than the turn budget."""
    most = cfg.max_llm_calls * cfg.max_new_tokens_per_turn
    return sorted({min(384, most), most})


def grpo_config(cfg: DemoConfig, layout: Layout, generator_url: str) -> GRPOConfig:
    """The GRPO recipe of the demo (agent env, local tools, heuristic judge, image server generator)."""
    from gsjax.train.grpo_config import GRPOConfig

    agent = demo_agent_config()
    slots = batch_shards() * math.ceil(cfg.prompts_per_step * cfg.group_size / batch_shards())
    raw = {
        "model": {"hf_dir": str(layout.sft_hf), "dtype": "float32", "param_dtype": "float32",
                  "attention_chunk": ATTENTION_CHUNK},
        "mesh": {"data": 1, "fsdp": -1},
        "optim": {"lr": cfg.grpo_lr, "weight_decay": 0.0, "schedule": "constant", "grad_clip": 1.0},
        "train": {"steps": max(cfg.grpo_steps, 1), "seed": cfg.seed, "log_every": 1, "checkpoint_every": 1,
                  "keep_checkpoints": 1, "out_dir": str(layout.grpo), "export_hf_at_end": False,
                  "tensorboard": False, "logits_chunk": 0, "compile_cache_dir": str(layout.compile_cache)},
        "data": {"path": str(layout.data / "rl_tasks.json"), "shuffle": True, "seed": cfg.seed},
        "rollout": {"engine": "jax", "group_size": cfg.group_size, "prompts_per_step": cfg.prompts_per_step,
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "max_slots": slots,
                    "max_total_len": cfg.max_context_tokens, "max_prefill_tokens": 4 * cfg.max_context_tokens,
                    "concurrency": slots,
                    # Few sampler programs: each compile cost 3-4 s, more than a whole step's decoding once
                    # warm. Every prefill padded to all slots, prompt buckets from 512, one decode window per
                    # octave: 11 programs over 6 steps instead of 26, GRPO steps 142 s instead of 180 s
                    # (same SFT checkpoint and episodes; a warm step's rollout 6-9 s instead of 4-10).
                    "min_prefill_rows": slots, "min_prefill_bucket": 512, "decode_window_splits": 1},
        "env": {"kind": "agent", "max_llm_calls": cfg.max_llm_calls,
                "max_new_tokens_per_turn": cfg.max_new_tokens_per_turn, "max_context_tokens": cfg.max_context_tokens,
                "max_reference_images": agent.max_reference_images, "image_max_pixels": agent.image_max_pixels,
                "image_min_pixels": agent.image_min_pixels, "date": agent.date, "tools_backend": "local",
                "system_prompt": agent.system_prompt},
        "reward": {"mode": "dual", "text_coef": 0.5, "judge": "heuristic", "generator": "server",
                   "generator_urls": [generator_url], "generation_attempts": 1, "workers": 2},
        # the sampler's logprobs are the old policy's (one update per step): no recompute pass to compile
        "advantage": {"old_logprobs": "rollout"},
        # Few update programs: compiling one took 14 s here, two updates' worth. One length, one vision-row size
        # (four 256-row images; padding rows where there are none), two head sizes: at most 2 programs where
        # per-episode shapes compiled 10 (103 s). A 2304 bucket for the 1850-2150-token episodes made an update
        # 5.2-5.7 s instead of 9.3-9.7, but compiled 3 update programs (81 s) instead of 1 (26 s): 104 s of
        # updates over 6 steps against 78 s on a first run, which is what a user sees.
        "batch": {"buckets": [cfg.max_context_tokens], "max_tokens_per_device": cfg.max_context_tokens,
                  "vision_row_buckets": [1024], "vision_in_every_batch": True,
                  "loss_position_buckets": loss_position_buckets(cfg), "num_minibatches": 1},
    }
    return GRPOConfig.from_dict(raw)


# --------------------------------------------------------------------------- stages


@contextmanager
def _stage(ctx: DemoContext, name: str, hook: Hook | None) -> Iterator[StageRow]:
    row = StageRow(name, "ran")
    ctx.console.print(f"[bold cyan]== {name}[/]")
    if hook is not None:
        hook(f"before_{name}", ctx)
    start = time.perf_counter()
    yield row
    if row.status == "ran" or row.status.startswith("resumed"):
        row.seconds = round(time.perf_counter() - start, 1)
    ctx.rows.append(row)
    ctx.console.print(f"   {row.status}" + (f" in {row.seconds:.1f} s" if row.seconds is not None else "")
                      + (f": {row.detail}" if row.detail else ""))
    if hook is not None:
        hook(f"after_{name}", ctx)


def _skipped(row: StageRow, info: Mapping[str, Any], detail: str) -> None:
    row.status = "skipped (done earlier)"
    row.detail = f"{detail}; took {info.get('seconds', '?')} s when it ran"


def stage_trajectories(ctx: DemoContext, row: StageRow) -> None:
    layout, done = ctx.layout, ctx.state.done("trajectories")
    if done and (layout.data / "sft.jsonl").is_file() and (layout.data / "rl_tasks.json").is_file():
        _skipped(row, done, f"{done['records']} SFT records")
        return
    start = time.perf_counter()
    shutil.rmtree(layout.data, ignore_errors=True)
    sets = write_sft_trajectories(layout.data, demo_agent_config(), demo_tools_config(), ctx.config.sft_records)
    write_rl_tasks(layout.data)
    row.detail = f"{sets.records} scripted episodes over the offline corpus -> SFT records ({sets.images} images)"
    ctx.state.mark("trajectories", records=sets.records, images=sets.images,
                   seconds=round(time.perf_counter() - start, 1))


def stage_sft(ctx: DemoContext, row: StageRow) -> None:
    layout, cfg, done = ctx.layout, ctx.config, ctx.state.done("sft")
    if done and done.get("steps", 0) >= cfg.sft_steps and (layout.sft_hf / "config.json").is_file():
        _skipped(row, done, f"{done['steps']} steps, export {layout.sft_hf}")
        return
    from gsjax.train.sft import run_sft

    start = time.perf_counter()
    records = ctx.state.done("trajectories")["records"]
    result = run_sft(sft_config(cfg, layout, records), progress=True, console=ctx.console)
    if result.resumed_from is not None:
        row.status = f"resumed from step {result.resumed_from}"
    row.detail = f"{result.final_step} steps, loss {result.last_metrics.get('loss', float('nan')):.3f}"
    if result.hf_dir is None:
        raise RuntimeError("SFT finished without an HF export")
    ctx.state.mark("sft", steps=result.final_step, hf_dir=str(result.hf_dir),
                   seconds=round(time.perf_counter() - start, 1))
    ctx.state.forget("grpo")  # a new SFT model: GRPO starts over from it


def grpo_available() -> str | None:
    """None when the GRPO trainer can be imported, else why not."""
    try:
        import gsjax.train.grpo  # noqa: F401
        import gsjax.train.grpo_config  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _grpo_environment(grpo_cfg: Any, url: str, layout: Layout, steps: int) -> Callable[..., Any]:
    """Their environment, with the generator swapped for a fast, recording client of our server."""
    from gsjax.train.grpo import make_environment
    from gsjax.train.grpo_rewards import RolloutRewarder, make_episode_rewarder

    def factory(engine: Any, model_cfg: Any, out_dir: Path) -> Any:
        env = make_environment(grpo_cfg, engine, model_cfg, out_dir)
        base = make_episode_rewarder(grpo_cfg.reward, grpo_cfg.env.max_reference_images)
        getattr(base.generator, "close", lambda: None)()
        rewarder = dataclasses.replace(base, generator=RecordingGenerator(image_client(url, steps), layout.generated))
        return dataclasses.replace(env, rewarder=RolloutRewarder(rewarder, grpo_cfg.reward.workers))

    return factory


def stage_grpo(ctx: DemoContext, row: StageRow) -> None:
    layout, cfg, done = ctx.layout, ctx.config, ctx.state.done("grpo")
    if cfg.grpo_steps == 0:
        row.status, row.detail = "not run", "--grpo-steps 0"
        return
    if done and done.get("steps", 0) >= cfg.grpo_steps:
        _skipped(row, done, f"{done['steps']} steps")
        return
    missing = grpo_available()
    if missing is not None:
        row.status, row.detail = "not run: GRPO trainer unavailable", missing
        ctx.notes.append(f"The GRPO stage did not run: gsjax.train.grpo could not be imported ({missing}).")
        return
    from gsjax.train.grpo import run_grpo

    sft_info = ctx.state.done("sft") or {}
    marker = layout.grpo / "from_sft.json"
    if marker.is_file() and json.loads(marker.read_text()).get("sft_steps") != sft_info.get("steps"):
        shutil.rmtree(layout.grpo)  # its checkpoints continue an older SFT model
    layout.grpo.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"sft_steps": sft_info.get("steps")}))
    assert ctx.server is not None
    ctx.server.wait_healthy()
    gcfg = grpo_config(cfg, layout, ctx.server.url)
    start = time.perf_counter()
    result = run_grpo(gcfg, progress=True, console=ctx.console,
                      environment=_grpo_environment(gcfg, ctx.server.url, layout, cfg.generator_steps))
    if result.resumed_from is not None:
        row.status = f"resumed from step {result.resumed_from}"
    last = result.history[-1] if result.history else {}
    row.detail = f"{result.final_step} steps" + (f", last reward mean {last['reward/total_mean']:.3f}"
                                                 if "reward/total_mean" in last else "")
    ctx.state.mark("grpo", steps=result.final_step, seconds=round(time.perf_counter() - start, 1))


# --------------------------------------------------------------------------- the run


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """One demo per work folder: two runs would write the same checkpoints and state."""
    with (root / ".demo.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another `gsjax demo` is running in {root}; wait for it or use another --workdir") \
                from None
        yield


def _start_over(layout: Layout) -> None:
    """Delete everything the demo wrote except its compiled programs, which depend on nothing a run wrote."""
    for entry in layout.root.glob("*") if layout.root.is_dir() else ():
        if entry == layout.compile_cache:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _needs_server(ctx: DemoContext) -> bool:
    cfg, done = ctx.config, ctx.state.done("grpo")
    grpo_pending = cfg.grpo_steps > 0 and not (done and done.get("steps", 0) >= cfg.grpo_steps) \
        and grpo_available() is None
    return grpo_pending or not (ctx.layout.report / "example_reward.json").is_file()


def run_demo(cfg: DemoConfig, *, hook: Hook | None = None, console: Console | None = None) -> DemoResult:
    """Run (or resume) every stage; the image server lives only inside this call.

    `hook(event, ctx)` is called at `before_<stage>`, `after_<stage>` and `server_launched` (tests use it
    to interrupt the run at a chosen point). Ctrl-C or SIGTERM always surfaces as KeyboardInterrupt, after
    the server has been stopped."""
    console = console or Console()
    layout = Layout(Path(cfg.workdir))
    if cfg.fresh:
        _start_over(layout)
    layout.root.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(cfg, layout, DemoState(layout.state), console)
    start = time.perf_counter()
    with _exclusive(layout.root), interruptible() as interrupts:
        try:
            with _stage(ctx, "trajectories", hook) as row:
                stage_trajectories(ctx, row)
            if _needs_server(ctx):
                ctx.server = ImageServer(ensure_tiny_pipeline(layout.pipeline), layout.server_log)
                ctx.server.launch()  # loads while SFT runs
                if hook is not None:
                    hook("server_launched", ctx)
            with _stage(ctx, "sft", hook) as row:
                stage_sft(ctx, row)
            with _stage(ctx, "grpo", hook) as row:
                stage_grpo(ctx, row)
            with _stage(ctx, "report", hook) as row:
                path = build_report(ctx, time.perf_counter() - start)
                row.detail = str(path)
            path = build_report(ctx, time.perf_counter() - start)  # once more, with the report row's time
        except Exception as exc:
            if interrupts.explains(exc):
                raise KeyboardInterrupt(f"interrupted ({type(exc).__name__} on the way out)") from exc
            raise
        finally:
            interrupts.cleanup()  # no interrupt may cut the server's shutdown short
            if ctx.server is not None:
                ctx.server.stop()
    seconds = time.perf_counter() - start
    console.print(f"[bold green]demo finished in {seconds:.0f} s[/]; report: {path}")
    return DemoResult(path, ctx.rows, seconds)


__all__ = ["STAGES", "DemoConfig", "DemoContext", "DemoResult", "Hook", "Layout", "run_demo"]
