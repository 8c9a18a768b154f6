"""The SFT run: config → mesh → sharded state (fresh, from HF, or resumed) → grain batches → jitted
steps → metrics, async checkpoints, HF export.

Resume is automatic: if `out_dir/checkpoints` holds a committed step, the train state (params, frozen
params, optimizer moments, step, RNG) and the data iterator position are restored, and the run continues
with the next batch; a run killed at any point and restarted ends with the same params as an
uninterrupted one. Only process 0 writes metrics; every process takes part in checkpoints.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from rich.console import Console

from gsjax.compile_cache import use_compile_cache
from gsjax.data import SFTDataConfig, make_sft_loader
from gsjax.errors import InputFileNotFound
from gsjax.models.qwen3_vl.checkpoint import export_hf, load_hf
from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.parallel.mesh import MeshConfig, build_mesh, maybe_initialize_distributed
from gsjax.parallel.multihost import gather_to_hosts
from gsjax.processing.tokenizer import load_tokenizer

from .checkpointing import Checkpointer, abstract_train_state
from .config import SFTConfig, SFTConfigError, check_freeze
from .guards import CHECKED, check_finite
from .learner import Learner, check_batch_size
from .metrics import MetricsLogger, StepTimer
from .model_loss import make_sft_loss
from .state import (
    ShardedSetup,
    TrainState,
    init_state,
    lr_schedule,
    make_optimizer,
    sharded_place,
    state_from_model,
    state_shardings,
)

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR, HF_SUBDIR = "checkpoints", "hf"


@dataclass
class SFTResult:
    out_dir: Path
    final_step: int
    resumed_from: int | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    data_stats: dict[str, Any] = field(default_factory=dict)
    hf_dir: Path | None = None


def data_config(cfg: SFTConfig) -> SFTDataConfig:
    """The data section, with its epoch count raised to cover `train.epochs` when that is what's set."""
    raw = dict(cfg.data)
    if cfg.train.epochs is not None:
        needed = math.ceil(cfg.train.epochs)
        if int(raw.get("num_epochs", needed)) != needed:
            log.info("data.num_epochs=%s replaced by ceil(train.epochs)=%d", raw.get("num_epochs"), needed)
        raw["num_epochs"] = needed
    return SFTDataConfig.from_dict(raw)


def total_steps(cfg: SFTConfig, batches_available: int, batches_per_epoch: int) -> int:
    """Optimizer updates of the run; refuses a run that would ask the loader for more batches than it has."""
    accum = cfg.train.grad_accum
    total = cfg.train.total_steps(max(batches_per_epoch // accum, 1))
    if total * accum > batches_available:
        raise SFTConfigError(
            f"train asks for {total} steps × grad_accum {accum} = {total * accum} batches but the data gives "
            f"{batches_available} ({batches_per_epoch} per epoch × data.num_epochs); lower train.steps or "
            f"raise data.num_epochs")
    return total


def initial_state(cfg: SFTConfig, model_config: Qwen3VLConfig, optimizer, setup: ShardedSetup) -> TrainState:
    """Fresh state: HF weights read slice by slice onto the mesh, or a random init computed sharded."""
    freeze = cfg.train.freeze
    if cfg.model.hf_dir:
        model = load_hf(cfg.model.hf_dir, runtime=model_config.runtime, place=sharded_place(setup, freeze),
                        config=model_config)
        return state_from_model(model, freeze, optimizer, setup, seed=cfg.train.seed)
    return init_state(model_config, freeze, optimizer, setup, seed=cfg.train.seed)


def _micro_batches(loader: Iterator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    return [next(loader) for _ in range(count)]


def _host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}


def run_sft(cfg: SFTConfig, *, progress: bool = True, console: Console | None = None,
            stop_after_steps: int | None = None) -> SFTResult:
    """Train until `train.steps`/`train.epochs` are done (or `stop_after_steps` more updates, for tests)."""
    maybe_initialize_distributed()
    use_compile_cache(cfg.train.compile_cache_dir)
    out_dir = Path(cfg.train.out_dir)
    model_config = cfg.model_config()
    check_freeze(model_config, cfg.train.freeze)
    mesh = build_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg.model.hf_dir)
    loader = make_sft_loader(data_config(cfg), tokenizer, model_config, process_index=jax.process_index(),
                             process_count=jax.process_count())
    check_batch_size(loader.cfg.batch_size * jax.process_count(), mesh, cfg.sharding_rules())
    total = total_steps(cfg, loader.num_steps, loader.steps_per_epoch)
    settings = cfg.optim.resolve(total)
    optimizer = make_optimizer(settings)
    schedule = lr_schedule(settings)
    setup = state_shardings(model_config, cfg.train.freeze, optimizer, mesh, cfg.sharding_rules())
    ckpt = Checkpointer(out_dir / CHECKPOINT_SUBDIR, keep=cfg.train.keep_checkpoints,
                        every=cfg.train.checkpoint_every, async_save=cfg.train.async_checkpointing,
                        config=cfg.to_dict())
    restored = ckpt.restore(abstract_train_state(model_config, cfg.train.freeze, optimizer, setup))
    if restored is not None:
        state, start = restored.state, restored.step
        loader.set_state(restored.data_state)
        log.info("resumed from step %d (data position %s)", start, restored.data_state.get("next_step"))
    else:
        state, start = initial_state(cfg, model_config, optimizer, setup), 0
    learner = Learner(setup, optimizer, make_sft_loss(cfg.train.logits_chunk))
    peak = cfg.train.peak_flops_per_device
    timer = StepTimer(model_config, None if peak is None else peak * jax.device_count())
    end = total if stop_after_steps is None else min(total, start + stop_after_steps)
    last: dict[str, float] = {}
    logger = MetricsLogger(out_dir, total, resume_step=start if restored else None,
                           tensorboard=cfg.train.tensorboard, progress=progress,
                           enabled=jax.process_index() == 0, console=console)
    try:
        timer.start()
        for step in range(start, end):
            micro = _micro_batches(loader, cfg.train.grad_accum)
            if len(micro) == 1:
                state, metrics = learner.step(state, micro[0])
            else:
                state, metrics = learner.accumulate(state, micro)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == end:
                last = _host_metrics(metrics)  # blocks on the step: timing below is real
                tokens = float(sum(np.asarray(b["attention_mask"]).sum() for b in micro))
                speed = timer.lap(tokens * jax.process_count(), micro[0]["input_ids"].shape[1])
                last.update(lr=float(schedule(step)), tokens_per_s=speed.tokens_per_second,
                            skipped=float(loader.stats["skipped"]))
                if speed.mfu is not None:
                    last["mfu"] = speed.mfu
                logger.log(done, last)
                check_finite(done, last, last_checkpoint=ckpt.latest_step())
            elif ckpt.should_save(done):  # never write a NaN state: read the step's figures first (the last
                # step is always logged above)
                check_finite(done, _host_metrics({k: metrics[k] for k in CHECKED}),
                             last_checkpoint=ckpt.latest_step())
            ckpt.save(done, state, loader.get_state())
        ckpt.save(end, state, loader.get_state(), force=True)
        ckpt.wait()
    finally:
        logger.close()
        ckpt.close()
        loader.close()
    hf_dir = None
    if end == total and cfg.train.export_hf_at_end:
        weights = gather_to_hosts({"params": state["params"], "frozen": state["frozen"]})  # every host takes part
        if jax.process_index() == 0:
            hf_dir = export_state_hf(setup, weights, out_dir / HF_SUBDIR, tokenizer_source=cfg.model.hf_dir)
    return SFTResult(out_dir, end, restored.step if restored else None, last, loader.stats, hf_dir)


# ---------------------------------------------------------------------- HF export
def model_from_state(setup: ShardedSetup, state: TrainState) -> Qwen3VL:
    return nnx.merge(setup.graphdef, state["params"], state["frozen"])


def tokenizer_files(source: str | Path | None) -> dict[str, str]:
    """The tokenizer's files as text (the model dir's own, or the offline Qwen build), for an HF export."""
    tokenizer = load_tokenizer(source)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}


def export_state_hf(setup: ShardedSetup, state: TrainState, directory: str | Path, *, dtype: str | None = None,
                    tokenizer_source: str | Path | None = None) -> Path:
    """Write the trained weights (and tokenizer) as an HF directory `transformers`/SGLang load directly."""
    model = model_from_state(setup, state)
    path = export_hf(model, directory, dtype=dtype, extra_files=tokenizer_files(tokenizer_source))
    log.info("exported HF checkpoint to %s", path)
    return path


def export_checkpoint(checkpoint_dir: str | Path, hf_dir: str | Path, *, step: int | None = None,
                      dtype: str | None = None) -> tuple[Path, int]:
    """`gsjax export`: rebuild the run's model from the config saved with the checkpoint, restore the
    weights onto this host's devices (fsdp over all of them) and write an HF directory."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / CHECKPOINT_SUBDIR).is_dir():
        checkpoint_dir = checkpoint_dir / CHECKPOINT_SUBDIR
    with Checkpointer(checkpoint_dir, read_only=True) as reader:
        chosen = step if step is not None else reader.latest_step()
        if chosen is None:
            raise InputFileNotFound(f"no committed checkpoint under {checkpoint_dir}")
        saved = reader.saved_config(chosen)
        cfg = SFTConfig.from_dict(saved)
        model_config = cfg.model_config()
        optimizer = make_optimizer(cfg.optim.resolve(max(chosen, 1)))
        setup = state_shardings(model_config, cfg.train.freeze, optimizer, build_mesh(MeshConfig(fsdp=-1)),
                                cfg.sharding_rules())
        restored = reader.restore(abstract_train_state(model_config, cfg.train.freeze, optimizer, setup), chosen)
    assert restored is not None
    path = export_state_hf(setup, restored.state, hf_dir, dtype=dtype, tokenizer_source=cfg.model.hf_dir)
    return path, chosen
