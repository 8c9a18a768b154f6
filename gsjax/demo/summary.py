"""What the report shows, gathered from the run's files: the SFT loss and GRPO metrics, the best GRPO
rollout and the scripted SFT example (its answer rendered by the image server and scored by the HEURISTIC
judge, cached for later runs), and a one-line account of what the policy did."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gsjax.demo.context import DemoContext
from gsjax.demo.generation import RecordingGenerator, generated_path, heuristic_rewarder, image_client
from gsjax.demo.report import Example, ReportData, write_report
from gsjax.demo.services import ServerStartError
from gsjax.demo.trajectories import demo_agent_config
from gsjax.fileio import atomic_write_text


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from gsjax.train.metrics import read_metrics

    return read_metrics(path)


def _messages(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"role": m["role"], "text": m["content"], "images": [i["path"] for i in m.get("images", [])]}
            for m in result.get("messages", [])]


def _example_from_result(title: str, result: Mapping[str, Any], reward: Mapping[str, Any] | None,
                         generated: Path | None) -> Example:
    return Example(title, _messages(result), result.get("prediction", {}), result.get("termination", "?"),
                   reward, generated)


def sft_example(ctx: DemoContext) -> Example | None:
    """The first scripted trajectory, its answer rendered by the image server and scored (HEURISTIC)."""
    episodes = sorted((ctx.layout.data / "episodes").glob("*/result.json"))
    if not episodes:
        return None
    result = json.loads(episodes[0].read_text())
    prediction = result.get("prediction", {})
    cache = ctx.layout.report / "example_reward.json"
    reward = json.loads(cache.read_text()) if cache.is_file() else None
    if reward is None and ctx.server is not None and "gen_prompt" in prediction:
        try:
            ctx.server.wait_healthy()
        except ServerStartError as exc:
            ctx.notes.append(f"The example answer was not rendered: {exc}")
        else:
            reward = _score_example(ctx, result)
            atomic_write_text(cache, json.dumps(reward, default=str))
    generated = generated_path(ctx.layout.generated, prediction.get("gen_prompt", ""))
    return _example_from_result("Scripted SFT trajectory (what the model was fine-tuned on)", result, reward,
                                generated if generated.is_file() else None)


def _score_example(ctx: DemoContext, result: Mapping[str, Any]) -> dict[str, Any]:
    """Render the scripted answer through the image server and score it against the subject's picture."""
    assert ctx.server is not None
    gt = ctx.layout.data / "gt" / f"{subject_key(result['task_id'])}.png"
    generator = RecordingGenerator(image_client(ctx.server.url, ctx.config.generator_steps), ctx.layout.generated)
    outcome = heuristic_rewarder(generator, demo_agent_config().max_reference_images)(
        sample_id=result["task_id"], question=result["question"], gt_image=str(gt), prediction=result["prediction"],
        termination=result.get("termination"))
    return outcome.as_record()


def subject_key(sft_task_id: str) -> str:
    """`sft-<subject>-<template>` -> `<subject>`, whose corpus picture is `data/gt/<subject>.png`."""
    return str(sft_task_id).removeprefix("sft-").rsplit("-", 1)[0]


def grpo_example(ctx: DemoContext) -> Example | None:
    """The best-rewarded rollout of the last GRPO step (answers first), as the policy actually played it."""
    files = sorted((ctx.layout.grpo / "rollouts").glob("step*.jsonl"))
    if not files:
        return None
    rows = _read_jsonl(files[-1])

    def rank(row: Mapping[str, Any]) -> tuple[int, float]:
        reward = (row.get("reward") or {}).get("reward")
        return (row.get("termination") == "answer", -1.0 if reward is None else float(reward))

    for row in sorted(rows, key=rank, reverse=True):
        path = Path(str(row.get("directory", ""))) / "result.json"
        if path.is_file():
            result = json.loads(path.read_text())
            generated = generated_path(ctx.layout.generated, result.get("prediction", {}).get("gen_prompt", ""))
            return _example_from_result(f"GRPO rollout {row['episode_id']} ({files[-1].stem}), sampled by the policy",
                                        result, row.get("reward"), generated if generated.is_file() else None)
    return None


def rollout_notes(folder: Path) -> list[str]:
    """What the policy actually did in GRPO, in one line, so a reader sees at once whether it used the
    protocol (a tiny model after a short SFT mostly does not)."""
    rows = [row for path in sorted(folder.glob("step*.jsonl")) for row in _read_jsonl(path)]
    if not rows:
        return []
    ends = Counter(str(row.get("termination")) for row in rows)
    tools = sum(int(row.get("tool_calls", 0)) for row in rows)
    errors = sum(int(row.get("protocol_errors", 0)) for row in rows)
    notes = [f"GRPO rollouts: {len(rows)} episodes, {tools} tool-call turns, {errors} protocol errors, terminations "
             f"{dict(ends)}."]
    if ends.get("answer", 0) * 2 < len(rows):
        notes.append("Most rollouts ended without a valid answer. Minutes of CPU SFT teach the tiny model the form of "
                     "the protocol (its greedy first turn is a valid tool call) but not yet to copy the subject's name "
                     "out of the prompt, so sampled turns often name another subject or derail into malformed JSON, "
                     "and rewards stay sparse over a handful of GRPO steps. What the demo shows is the whole path "
                     "running: data, both trainers, checkpoints, the image server and the rewards.")
    return notes


def build_report(ctx: DemoContext, total_seconds: float) -> Path:
    """Gather everything above and write the report folder."""
    sft_metrics = _read_jsonl(ctx.layout.sft / "metrics.jsonl")
    grpo_metrics = _read_jsonl(ctx.layout.grpo / "metrics.jsonl")
    examples = [e for e in (grpo_example(ctx), sft_example(ctx)) if e is not None]
    notes = list(ctx.notes) + rollout_notes(ctx.layout.grpo / "rollouts")
    data = ReportData(
        workdir=ctx.layout.root, stages=list(ctx.rows),
        sft_loss=[(float(m["step"]), float(m["loss"])) for m in sft_metrics if "loss" in m],
        grpo_reward=[(float(m["step"]), float(m["reward/total_mean"])) for m in grpo_metrics
                     if "reward/total_mean" in m],
        grpo_steps=grpo_metrics, examples=examples, notes=notes, total_seconds=total_seconds)
    return write_report(data, ctx.layout.report)
