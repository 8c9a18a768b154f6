"""The GRPO run: prompts -> n episodes each on the rollout engine (token-in/token-out) -> rewards -> group
advantages -> RL batches (exact ids, loss masks, every image of the trajectory) -> policy update ->
weights pushed to the engine, every phase timed.

Versions: the weights after k updates are version "k"; the engine samples step k's episodes under it and
every token record names the version of each of its turns. Exclusions: an episode whose tools, generator
or judge failed (or that has no token record) is left out of the statistics and the loss and counted by
reason; zero-reward episodes stay in. Resume is automatic from `out_dir/checkpoints`: learner state,
optimizer, step and the prompt position are restored, the engine is rebuilt from the restored weights,
and sampling seeds depend only on (seed, step, prompt, rollout), so the resumed run takes the same
prompts and asks the engine for the same samples as the interrupted one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

from gsjax.agent.config import ToolsConfig
from gsjax.agent.engine_policy import EnginePolicyConfig
from gsjax.compile_cache import use_compile_cache
from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.flops import train_flops_per_token
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.parallel.mesh import MeshConfig, build_mesh, maybe_initialize_distributed
from gsjax.parallel.multihost import gather_to_hosts, host_block, host_totals
from gsjax.rollout.engine import RolloutEngine
from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig

from .advantages import ExcludedEpisodes, group_advantages
from .checkpointing import Checkpointer, abstract_train_state
from .config import check_freeze
from .grpo_config import GRPOConfig, GRPOConfigError
from .grpo_data import CORPUS_SOURCE, PromptStream, corpus_prompts, read_rl_records, synthetic_prompts
from .grpo_hosts import ProcessAgreement, everyone, excluded_everywhere
from .grpo_learner import RLLearner, with_old_logprobs
from .grpo_metrics import group_metrics, summary_metrics
from .grpo_rewards import RolloutRewarder, make_episode_rewarder
from .grpo_toy import ToyEnvironment
from .guards import CHECKED, check_finite
from .learner import batch_parts
from .losses import combine_metric_stats, finalize_metrics
from .metrics import MetricsLogger, throughput
from .rl_batch import ImageTokenMismatch, RLSample, build_rl_batches, rl_sample
from .rollout_phase import AgentEnvironment, Environment, Rollout, run_rollouts
from .sft import CHECKPOINT_SUBDIR, HF_SUBDIR, export_state_hf, initial_state, model_from_state
from .state import ShardedSetup, TrainState, make_optimizer, state_shardings

log = logging.getLogger(__name__)

SAMPLED_VISION_TOKEN = "sampled_vision_token"  # the policy emitted an image/vision marker id itself
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
PHASES = ("rollout", "reward", "update", "sync")


@dataclass
class GRPOResult:
    out_dir: Path
    final_step: int
    resumed_from: int | None
    history: list[dict[str, float]] = field(default_factory=list)  # the metrics of every step this call ran
    hf_dir: Path | None = None


# ---------------------------------------------------------------------- building blocks
def split_devices(cfg: GRPOConfig) -> tuple[list, list | None]:
    """(learner devices, this host's rollout devices or None to share): the embedded sampler may get the
    last `rollout.rollout_devices` devices of each host to itself, disjoint from the learner's."""
    devices = list(jax.devices())
    k = cfg.rollout.rollout_devices
    if cfg.rollout.engine != "jax" or k == 0:
        return devices, None
    per_host: dict[int, list] = {}
    for device in devices:
        per_host.setdefault(device.process_index, []).append(device)
    fewest = min(len(host) for host in per_host.values())
    if k >= fewest:
        raise GRPOConfigError(f"rollout.rollout_devices={k} leaves no device for the learner ({fewest} per host)")
    rollout = {device for host in per_host.values() for device in host[-k:]}
    return [d for d in devices if d not in rollout], per_host[jax.process_index()][-k:]


def host_weights(state: TrainState, dtype: Any) -> tuple[Any, Any]:
    """(params, frozen) for a sampler: the learner's arrays, or with several hosts every array in full on
    this host (a collective, after casting floats to the sampler's `dtype` to halve the traffic from fp32),
    since each host's sampler runs on its own devices."""
    if jax.process_count() == 1:
        return state["params"], state["frozen"]
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    weights = gather_to_hosts(jax.tree.map(cast, {"params": state["params"], "frozen": state["frozen"]}))
    return weights["params"], weights["frozen"]


def sampler_model(setup: ShardedSetup, state: TrainState, dtype: Any) -> Qwen3VL:
    """A copy of the policy for the sampler (the learner donates its buffers), cast to the compute dtype."""
    cast = lambda x: jnp.array(x, dtype=dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)  # noqa: E731
    params, frozen = host_weights(state, dtype)
    return nnx.merge(setup.graphdef, jax.tree.map(cast, params), jax.tree.map(cast, frozen))


def make_engine(cfg: GRPOConfig, setup: ShardedSetup, state: TrainState, version: str,
                rollout_devices: Sequence | None, out_dir: Path) -> RolloutEngine:
    r = cfg.rollout
    if r.engine == "sglang":
        from gsjax.rollout.sglang import SGLangEngine

        engine = SGLangEngine(r.sglang_url, weights_root=out_dir / "rollout_weights")
        engine.update_weights(model_from_state(setup, state), version)
        return engine
    if rollout_devices is None and jax.process_count() > 1:  # the sampler shares this host's learner devices
        rollout_devices = [d for d in setup.mesh.devices.flat if d.process_index == jax.process_index()]
    mesh = setup.mesh if rollout_devices is None else build_mesh(MeshConfig(data=1, fsdp=-1), rollout_devices)
    model_cfg = cfg.model_config()
    sampler_cfg = SamplerConfig(max_slots=r.max_slots, max_total_len=r.max_total_len,
                                min_prefill_bucket=r.min_prefill_bucket, max_prefill_tokens=r.max_prefill_tokens,
                                min_prefill_rows=r.min_prefill_rows, decode_window_splits=r.decode_window_splits,
                                prefix_reuse=r.prefix_reuse)
    return JaxSampler(sampler_model(setup, state, model_cfg.runtime.dtype), sampler_cfg, mesh=mesh,
                      rules=cfg.sharding_rules(), weight_version=version)


def push_weights(cfg: GRPOConfig, engine: RolloutEngine, setup: ShardedSetup, state: TrainState, version: str) -> None:
    """The sync phase: the JAX sampler takes the trainable params by path (frozen ones never change); an
    SGLang sidecar gets the whole model through an HF export."""
    if cfg.rollout.engine == "sglang":
        engine.update_weights(model_from_state(setup, state), version)
    else:
        engine.update_weights(host_weights(state, cfg.model.dtype)[0], version)


def load_prompts(cfg: GRPOConfig) -> PromptStream:
    if cfg.data.path == CORPUS_SOURCE:
        prompts, skipped = corpus_prompts(cfg.env.local_corpus_dir), {}
    elif cfg.data.path:
        prompts, skipped = read_rl_records(cfg.data.path, cfg.data.image_root)
    else:
        prompts, skipped = synthetic_prompts(cfg.data.synthetic_prompts), {}
    return PromptStream(prompts, cfg.rollout.prompts_per_step, cfg.data.shuffle, cfg.data.seed, skipped=skipped)


def make_environment(cfg: GRPOConfig, engine: RolloutEngine, model_cfg: Qwen3VLConfig, out_dir: Path,
                     tokenizer: Any = None) -> Environment:
    r, e = cfg.rollout, cfg.env
    if e.kind == "toy":
        ceiling = min(model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
                      model_cfg.text.vocab_size)
        return ToyEnvironment(engine, (e.toy_target_high, ceiling), (e.toy_target_low, e.toy_target_high),
                              e.toy_prompt_len, e.toy_new_tokens, r.temperature, r.top_p, r.top_k, r.seed)
    from gsjax.processing.tokenizer import load_tokenizer

    agent_cfg = e.agent_config(r.concurrency)
    image_cfg = e.image_processor(model_cfg.vision)
    policy_cfg = EnginePolicyConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_context_tokens=e.max_context_tokens)
    rewarder = RolloutRewarder(make_episode_rewarder(cfg.reward, e.max_reference_images), cfg.reward.workers)
    return AgentEnvironment(engine, tokenizer or load_tokenizer(cfg.model.hf_dir), agent_cfg,
                            ToolsConfig(backend=e.tools_backend, local_corpus_dir=e.local_corpus_dir), image_cfg,
                            policy_cfg, out_dir / "episodes", rewarder, r.concurrency, r.seed, e.keep_episode_dirs)


def vision_ids(model_cfg: Qwen3VLConfig) -> frozenset[int]:
    return frozenset({model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
                      model_cfg.vision_end_token_id})


def training_samples(rollouts: Sequence[Rollout], advantages: np.ndarray, keep: np.ndarray,
                     model_cfg: Qwen3VLConfig) -> tuple[list[RLSample], ExcludedEpisodes]:
    """RL samples of the kept rollouts; a trajectory the model cannot be trained on as sampled (it emitted
    a vision marker id, or its image pads disagree with its images) is excluded and counted."""
    banned = vision_ids(model_cfg)
    excluded = ExcludedEpisodes()
    samples = []
    for rollout, advantage, kept in zip(rollouts, advantages, keep):
        if not kept:
            continue
        record = rollout.record
        assert record is not None
        if any(m and t in banned for t, m in zip(record.input_ids, record.loss_mask)):
            excluded.add(SAMPLED_VISION_TOKEN)
            continue
        try:
            samples.append(rl_sample(record, float(advantage), model_cfg, episode_id=rollout.episode_id,
                                     group_id=rollout.group_id))
        except ImageTokenMismatch:
            excluded.add(IMAGE_TOKEN_MISMATCH)
    return samples, excluded


def rollout_summaries(rollouts: Sequence[Rollout], advantages: np.ndarray, version: str) -> list[dict[str, Any]]:
    """The step's rollout log lines (JSON-safe: a multi-host run gathers them from every host)."""
    return [json.loads(json.dumps({**r.summary(), "advantage": None if np.isnan(a) else float(a),
                                   "step_version": version}, default=str)) for r, a in zip(rollouts, advantages)]


def _write_rollouts(path: Path, summaries: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(line) for line in summaries]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------- one step
@dataclass
class StepContext:
    cfg: GRPOConfig
    model_cfg: Qwen3VLConfig
    setup: ShardedSetup
    learner: RLLearner
    engine: RolloutEngine
    env: Environment
    peak_flops: float | None
    out_dir: Path
    loop: asyncio.AbstractEventLoop | None = None  # the run's event loop for the rollout phase


def prefill_counters(engine: RolloutEngine) -> dict[str, float]:
    """Prompt tokens the embedded sampler prefilled and took from retained prefixes so far (multi-turn
    episodes reuse their history), and the programs it has compiled (a step whose delta is not 0 spent part
    of its rollout time compiling); empty for engines that do not count them."""
    stats = getattr(engine, "stats", None)
    if stats is None:
        return {}
    compilations = getattr(engine, "compilations", None)
    return {"prefill_tokens": float(stats.prefill_tokens), "reused_prompt_tokens": float(stats.reused_tokens),
            "prefill_calls": float(stats.prefill_calls), "decode_steps": float(stats.decode_steps),
            "sampler_idle_s": engine.idle_seconds() if hasattr(engine, "idle_seconds") else stats.idle_s,
            "sampler_device_wait_s": stats.device_wait_s,
            **({"compiled_programs": float(sum(compilations().values()))} if compilations else {})}


def update_policy(ctx: StepContext, state: TrainState, samples: Sequence[RLSample]
                  ) -> tuple[TrainState, dict[str, float], ExcludedEpisodes]:
    """All mini-batches of the step (old logprobs recomputed first, under the step's sampling weights)."""
    parts, hosts = batch_parts(ctx.setup.mesh, ctx.setup.rules), None
    if jax.process_count() > 1:  # this host's rows, on shapes every host agrees on
        parts, hosts = parts // jax.process_count(), ProcessAgreement()
    batches = build_rl_batches(samples, ctx.model_cfg, ctx.cfg.loss, ctx.cfg.batch, parts=parts, hosts=hosts)
    minibatches = batches.minibatches
    if ctx.cfg.advantage.old_logprobs == "recompute":
        minibatches = [[with_old_logprobs(b, ctx.learner.logprobs(state, b)) for b in mb] for mb in minibatches]
    tokens = seq = pixel_rows = 0.0
    losses, norms, stats = [], [], []
    for micro in minibatches:
        state, metrics = (ctx.learner.step(state, micro[0]) if len(micro) == 1
                          else ctx.learner.accumulate(state, micro))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        stats.append(jax.device_get(metrics.get("stats", {})))
        for b in micro:
            tokens += float(np.asarray(b["attention_mask"]).sum())
            seq = max(seq, float(b["input_ids"].shape[1]))
            vision = b.get("vision")
            pixel_rows += 0.0 if vision is None else float((np.asarray(vision["segment_ids"]) >= 0).sum())
    images = sum(0 if s.example.image_grid_thw is None else len(s.example.image_grid_thw) for s in samples)
    tokens, pixel_rows, images = host_totals([tokens, pixel_rows, images])
    out = {"update/loss": float(np.mean(losses)), "update/grad_norm": float(np.mean(norms)),
           "update/trained_tokens": tokens, "update/seq_len": seq, "update/images": float(images),
           "update/pixel_rows": pixel_rows, "update/minibatches": float(len(minibatches)),
           "update/micro_batches": float(sum(len(m) for m in minibatches))}
    # clip fractions, PPO KL, ratio (max), rollout/trainer logprob mismatch, over the step's mini-batches
    out.update({f"policy/{k}": v for k, v in finalize_metrics(combine_metric_stats(stats)).items()})
    return state, out, batches.excluded


def grpo_step(ctx: StepContext, state: TrainState, prompts: Sequence[Any], step: int
              ) -> tuple[TrainState, dict[str, float], list[Rollout]]:
    """One GRPO step (rollout, reward, update, sync); returns the new state, its metrics and the rollouts."""
    cfg, version = ctx.cfg, str(step)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    before = prefill_counters(ctx.engine)
    prompts = host_block(prompts)  # this host's whole groups (all of them with one process)
    rollouts = run_rollouts(ctx.env, prompts, cfg.rollout.group_size, step, ctx.loop)
    timings["rollout"] = time.perf_counter() - clock
    counters = {f"rollout/{k}": v - before[k] for k, v in prefill_counters(ctx.engine).items()}
    prefill = dict(zip(counters, host_totals(list(counters.values()))))
    clock = time.perf_counter()
    ctx.env.score(rollouts, step)
    timings["reward"] = time.perf_counter() - clock

    clock = time.perf_counter()
    rewards = [r.reward_value for r in rollouts]
    adv = group_advantages(rewards, [r.group_id for r in rollouts], cfg.advantage.eps, cfg.advantage.all_equal,
                           cfg.advantage.norm_by_std, failures=[r.failure for r in rollouts],
                           group_size=cfg.rollout.group_size, drop_nonpositive=cfg.advantage.drop_nonpositive)
    samples, unusable = training_samples(rollouts, adv.advantages, adv.keep, ctx.model_cfg)
    excluded = adv.excluded.merge(unusable)
    summaries = everyone(rollout_summaries(rollouts, adv.advantages, version))  # every host's rollouts
    every_reward = [None if s["reward"] is None else s["reward"]["reward"] for s in summaries]
    metrics: dict[str, float] = {**summary_metrics(summaries, version),
                                 **group_metrics(every_reward, [s["group_id"] for s in summaries]), **prefill}
    trained = ProcessAgreement().totals([len(samples)])[0]
    if trained:  # every host takes part in the update, with padding rows if it has no sample of its own
        state, update, too_long = update_policy(ctx, state, samples)
        # before the weights reach the engine or a checkpoint
        check_finite(step + 1, {k: update[f"update/{k}"] for k in CHECKED})
        excluded = excluded.merge(too_long)
        metrics.update(update)
        jax.block_until_ready(state["params"])
    metrics["update/skipped"] = float(not trained)
    metrics["update/samples"] = float(trained)
    timings["update"] = time.perf_counter() - clock

    clock = time.perf_counter()
    push_weights(cfg, ctx.engine, ctx.setup, state, str(step + 1))
    timings["sync"] = time.perf_counter() - clock

    metrics.update(excluded_everywhere(excluded).as_metrics("excluded/"))
    metrics.update({f"time/{k}_s": v for k, v in timings.items()})
    metrics["time/step_s"] = sum(timings.values())
    sampled = float(sum(s["sampled_tokens"] for s in summaries))
    metrics["rollout/sampled_tokens"] = sampled
    metrics["rollout/tokens_per_s"] = sampled / timings["rollout"] if timings["rollout"] > 0 else 0.0
    if trained:
        flops = train_flops_per_token(ctx.model_cfg, int(metrics["update/seq_len"]))
        speed = throughput(metrics["update/trained_tokens"], timings["update"], flops, ctx.peak_flops)
        metrics["tokens_per_s"] = speed.tokens_per_second
        if speed.mfu is not None:
            metrics["mfu"] = speed.mfu
    if jax.process_index() == 0:
        _write_rollouts(ctx.out_dir / "rollouts" / f"step{step:06d}.jsonl", summaries)
    return state, metrics, rollouts


# ---------------------------------------------------------------------- the run
def check_hosts(cfg: GRPOConfig) -> None:
    """A multi-host run gives each host its own embedded sampler and whole prompt groups."""
    hosts = jax.process_count()
    if hosts == 1:
        return
    if cfg.rollout.engine != "jax":
        raise GRPOConfigError(f"a multi-host run ({hosts} processes) samples with the embedded JAX sampler, one per "
                              f"host; rollout.engine={cfg.rollout.engine!r} is single-host")
    if cfg.rollout.prompts_per_step % hosts:
        raise GRPOConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} does not split into whole "
                              f"prompt groups over {hosts} hosts")


def run_grpo(cfg: GRPOConfig, *, progress: bool = True, console: Console | None = None,
             stop_after_steps: int | None = None,
             environment: Callable[[RolloutEngine, Qwen3VLConfig, Path], Environment] | None = None,
             engine_factory: Callable[..., RolloutEngine] | None = None) -> GRPOResult:
    """Train until `train.steps` / `train.epochs` are done (or `stop_after_steps` more steps, for tests).

    `environment(engine, model_config, out_dir)` and `engine_factory(cfg, setup, state, version, devices,
    out_dir)` replace the configured ones (tests: scripted engines, custom rewards)."""
    maybe_initialize_distributed()
    use_compile_cache(cfg.train.compile_cache_dir)
    check_hosts(cfg)
    out_dir = Path(cfg.train.out_dir)
    model_cfg = cfg.model_config()
    check_freeze(model_cfg, cfg.train.freeze)
    learner_devices, rollout_devices = split_devices(cfg)
    mesh = build_mesh(cfg.mesh, learner_devices)
    stream = load_prompts(cfg)
    total = cfg.train.total_steps(stream.steps_per_epoch)
    optimizer = make_optimizer(cfg.optim.resolve(total))
    setup = state_shardings(model_cfg, cfg.train.freeze, optimizer, mesh, cfg.sharding_rules())
    ckpt = Checkpointer(out_dir / CHECKPOINT_SUBDIR, keep=cfg.train.keep_checkpoints, every=cfg.train.checkpoint_every,
                        async_save=cfg.train.async_checkpointing, config=cfg.to_dict())
    restored = ckpt.restore(abstract_train_state(model_cfg, cfg.train.freeze, optimizer, setup))
    if restored is not None:
        state, start = restored.state, restored.step
        stream.set_state(restored.data_state.get("prompts", {}))
        log.info("resumed from step %d (prompt position %s)", start, stream.get_state())
    else:
        state, start = initial_state(cfg, model_cfg, optimizer, setup), 0  # type: ignore[arg-type]
    engine = (engine_factory or make_engine)(cfg, setup, state, str(start), rollout_devices, out_dir)
    env = (environment(engine, model_cfg, out_dir) if environment is not None
           else make_environment(cfg, engine, model_cfg, out_dir))
    learner = RLLearner(setup, optimizer, cfg.loss, cfg.train.logits_chunk)
    peak = cfg.train.peak_flops_per_device
    loop = asyncio.new_event_loop()
    ctx = StepContext(cfg, model_cfg, setup, learner, engine, env,
                      None if peak is None else peak * len(learner_devices), out_dir, loop)
    end = total if stop_after_steps is None else min(total, start + stop_after_steps)
    history: list[dict[str, float]] = []
    logger = MetricsLogger(out_dir, total, resume_step=start if restored else None, tensorboard=cfg.train.tensorboard,
                           progress=progress, enabled=jax.process_index() == 0, console=console)
    try:
        for step in range(start, end):
            data_position = stream.get_state()
            state, metrics, _ = grpo_step(ctx, state, stream.next_batch(), step)
            metrics.update(epoch=float(data_position["epoch"]), weight_version=float(step + 1))
            history.append(metrics)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == end:
                logger.log(step + 1, metrics)
            ckpt.save(step + 1, state, {"prompts": stream.get_state()})
        ckpt.save(end, state, {"prompts": stream.get_state()}, force=True)
        ckpt.wait()
    finally:
        logger.close()
        ckpt.close()
        engine.close()
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    hf_dir = None
    if end == total and cfg.train.export_hf_at_end:
        weights = gather_to_hosts({"params": state["params"], "frozen": state["frozen"]})  # every host takes part
        if jax.process_index() == 0:
            hf_dir = export_state_hf(setup, weights, out_dir / HF_SUBDIR, tokenizer_source=cfg.model.hf_dir)
    return GRPOResult(out_dir, end, restored.step if restored else None, history, hf_dir)
