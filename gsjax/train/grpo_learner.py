"""The learner side of GRPO: the SFT learner's jitted, sharded step with the GRPO policy loss, batches that
carry the RL keys, and the old-logprob pass.

`Learner.shard_batch` keeps only the SFT keys, so `RLLearner` also places the RL arrays (`old_logprobs`,
`advantages`, ...) with the batch sharding. The loss is `model_loss.make_grpo_loss`, which honours
`train.logits_chunk` (the 150k vocabulary otherwise dominates memory) unless the entropy term needs full logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsjax.parallel.multihost import global_batch_array, local_rows
from gsjax.parallel.sharding import batch_sharding, logical_sharding

from .learner import Learner
from .losses import GRPOLossConfig
from .model_loss import Batch, make_grpo_loss, target_logprobs
from .state import TrainState

RL_KEYS = ("old_logprobs", "rollout_logprobs", "advantages", "row_denominator", "ref_logprobs")


class RLLearner(Learner):
    """`Learner` over RL batches; `logprobs(state, batch)` is the trainer's log p(targets) (masked)."""

    def __init__(self, setup: Any, optimizer: Any, loss_cfg: GRPOLossConfig, logits_chunk: int = 0):
        super().__init__(setup, optimizer, make_grpo_loss(loss_cfg, logits_chunk))
        self.loss_cfg, self.logits_chunk = loss_cfg, logits_chunk
        self._logprobs = jax.jit(self._logprob_fn)

    def _logprob_fn(self, params: Any, frozen: Any, batch: Batch) -> jax.Array:
        model = nnx.merge(self.setup.graphdef, params, frozen)
        with logical_sharding(self.setup.mesh, self.setup.rules):
            logprobs = target_logprobs(model, batch, self.logits_chunk)
        return jnp.where(batch["target_mask"] > 0, logprobs, 0.0)

    def shard_batch(self, batch: Batch) -> dict[str, Any]:
        out = super().shard_batch(batch)
        mesh, rules = self.setup.mesh, self.setup.rules
        for key in RL_KEYS:
            if key in batch:
                value = np.asarray(batch[key])
                out[key] = global_batch_array(value, batch_sharding(mesh, value.ndim, rules))
        return out

    def logprobs(self, state: TrainState, batch: Batch) -> np.ndarray:
        """(B, L) float32 log p(target) under the current params, 0 off the loss mask (host array; in a
        multi-host run, of this host's rows)."""
        return local_rows(self._logprobs(state["params"], state["frozen"], self.shard_batch(batch)))


def with_old_logprobs(batch: Mapping[str, Any], logprobs: np.ndarray) -> dict[str, Any]:
    """A copy of the host batch whose `old_logprobs` are the trainer's recomputation."""
    return {**batch, "old_logprobs": np.asarray(logprobs, np.float32)}
