"""The training losses applied to a model on a batch (SFT cross-entropy, the GRPO policy loss), through one
log p(target) function that applies the LM head only where the loss needs it.

A batch may carry `loss_positions` (B, K) int32: per row, the positions whose target is trained (from
`gsjax.data.collate.loss_positions`), padded with L-1, whose target is never trained. Then the hidden
states of those K positions are gathered before the LM head, and the results scattered back to (B, L).
Agent trajectories train only the model's turns (a few hundred tokens) of sequences whose system prompt,
tool results and image tokens fill thousands of positions, and the head over a 150k vocabulary is the
biggest matmul of a small model, so this cuts most of the step's FLOPs and the logits' memory. Positions
off the loss mask come back as 0 (the losses mask them anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gsjax.models.qwen3_vl.model import LOGITS
from gsjax.parallel.sharding import constrain

from .losses import (
    GRPOLossConfig,
    chunked_token_logprobs,
    grpo_policy_loss,
    masked_nll,
    token_entropy,
    token_logprobs,
)

Batch = Mapping[str, Any]
# (loss sum, denominator) or (loss sum, denominator, additive statistics for metrics)
LossFn = Callable[[Any, Batch], tuple[jax.Array, ...]]


def gather_positions(values: jax.Array, positions: jax.Array) -> jax.Array:
    """values[b, positions[b, k], ...] as a (B, K, ...) array."""
    index = positions.reshape(positions.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def scatter_positions(values: jax.Array, positions: jax.Array, valid: jax.Array, length: int) -> jax.Array:
    """The inverse of `gather_positions` for (B, K) values: a (B, L) array, 0 where nothing was gathered."""
    rows = jnp.arange(values.shape[0])[:, None]
    out = jnp.zeros((values.shape[0], length), values.dtype)
    return out.at[rows, positions].add(jnp.where(valid, values, 0))


def policy_logprobs(model: Any, batch: Batch, temperature: float = 1.0, logits_chunk: int = 0,
                    with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """(log p(targets), entropy or None), both (B, L) fp32, of the policy at `temperature`, images included.

    With `logits_chunk` > 0 the LM head runs chunk by chunk (rematerialised in the backward pass); entropy
    then is unavailable. With `loss_positions` in the batch only those positions reach the head."""
    args = (batch["input_ids"], batch["positions"], batch["attention_mask"], batch.get("vision"))
    if logits_chunk > 0 and with_entropy:
        raise ValueError("the entropy term needs full logits: set logits_chunk to 0")
    hidden = model(*args, compute_logits=False).hidden
    targets = batch["targets"]
    positions = batch.get("loss_positions")
    if positions is not None:
        length = targets.shape[1]
        valid = gather_positions(batch["target_mask"], positions) > 0
        hidden, targets = gather_positions(hidden, positions), gather_positions(targets, positions)
    head = model.lm_head_matrix()
    head = head if temperature == 1.0 else head / temperature
    entropy = None
    if logits_chunk > 0:
        logprobs = chunked_token_logprobs(hidden, head, targets, logits_chunk)
    else:
        logits = constrain(hidden @ head, LOGITS).astype(jnp.float32)
        logprobs = token_logprobs(logits, targets)
        entropy = token_entropy(logits) if with_entropy else None
    if positions is None:
        return logprobs, entropy
    logprobs = scatter_positions(logprobs, positions, valid, length)
    return logprobs, None if entropy is None else scatter_positions(entropy, positions, valid, length)


def target_logprobs(model: Any, batch: Batch, logits_chunk: int = 0) -> jax.Array:
    """log p(targets) at temperature 1 (0 off the loss positions when the batch carries them)."""
    return policy_logprobs(model, batch, logits_chunk=logits_chunk)[0]


def sft_loss(model: Any, batch: Batch, logits_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy: (Σ NLL over target tokens, number of target tokens)."""
    return masked_nll(target_logprobs(model, batch, logits_chunk), batch["target_mask"])


def make_sft_loss(logits_chunk: int = 0) -> LossFn:
    return functools.partial(sft_loss, logits_chunk=logits_chunk)


def policy_loss_terms(model: Any, batch: Batch, cfg: GRPOLossConfig, logits_chunk: int = 0
                      ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Forward the policy on an RL batch and apply `grpo_policy_loss` with the batch's RL keys.

    Entropy is computed only when it enters the loss; it needs full logits, so it turns chunking off."""
    with_entropy = cfg.entropy_coef != 0
    logprobs, entropy = policy_logprobs(model, batch, cfg.temperature, 0 if with_entropy else logits_chunk,
                                        with_entropy)
    return grpo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["target_mask"], cfg,
                            ref_logprobs=batch.get("ref_logprobs"), rollout_logprobs=batch.get("rollout_logprobs"),
                            entropy=entropy, row_denominator=batch.get("row_denominator"))


def make_grpo_loss(cfg: GRPOLossConfig, logits_chunk: int = 0) -> LossFn:
    """A learner `LossFn`: (model, batch) -> (loss numerator, denominator, statistics) of the GRPO loss."""
    return functools.partial(policy_loss_terms, cfg=cfg, logits_chunk=logits_chunk)
