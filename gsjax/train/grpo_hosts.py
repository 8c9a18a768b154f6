"""What the hosts of a multi-process GRPO run agree on.

Each host runs its own embedded sampler over its own devices, on its own block of the step's prompts
(whole groups, so advantages need nothing from other hosts), and builds its own rows of the RL batch. The
learner's update is one SPMD program over every host's devices, so the hosts must agree on:

- the shapes of every micro-batch (rows per host, length, vision rows) and how many there are: each host
  plans its micro-batches, the plans are gathered, and for each length every host uses the most
  micro-batches any host has, each with the most rows and vision rows any host puts in it (so the padded
  tokens per device stay within the budget that planned them); a host fills the rest with padding rows;
- whether the step trains at all, and the counts that enter the loss denominator;
- the step's metrics, reported over every host's rollouts (their JSON summaries are gathered).

With one process none of this is used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from gsjax.parallel.multihost import allgather_json, host_totals

from .advantages import ExcludedEpisodes
from .rl_batch import MicroShape


def agreed_shapes(per_host: Sequence[Sequence[Sequence[MicroShape]]]) -> list[list[MicroShape]]:
    """Per mini-batch, the micro-batch shapes every host uses, from each host's own (pure; see module doc).

    Lengths come longest first; a length's k-th micro-batch has the most rows (and vision rows) of any
    host's k-th micro-batch of that length."""
    minibatches = {len(host) for host in per_host}
    if len(minibatches) != 1:
        raise ValueError(f"hosts planned different numbers of mini-batches: {sorted(minibatches)}")
    out = []
    for m in range(minibatches.pop()):
        by_length: dict[int, list[MicroShape]] = {}
        for host in per_host:
            ordinal: Counter[int] = Counter()
            for shape in host[m]:
                k = ordinal[shape.length]
                ordinal[shape.length] += 1
                slots = by_length.setdefault(shape.length, [])
                if k == len(slots):
                    slots.append(shape)
                else:
                    slots[k] = MicroShape(max(slots[k].rows, shape.rows), shape.length,
                                          max(slots[k].vision_rows, shape.vision_rows))
        out.append([shape for length in sorted(by_length, reverse=True) for shape in by_length[length]])
    return out


class ProcessAgreement:
    """`rl_batch.HostAgreement` over `jax.distributed` (collectives: every host calls each method)."""

    def totals(self, local: Sequence[int]) -> list[int]:
        return [int(round(v)) for v in host_totals(local)]

    def shapes(self, local: Sequence[Sequence[MicroShape]]) -> list[list[MicroShape]]:
        gathered = allgather_json([[[s.rows, s.length, s.vision_rows] for s in mb] for mb in local])
        return agreed_shapes([[[MicroShape(*s) for s in mb] for mb in host] for host in gathered])


def everyone(values: list[Any]) -> list[Any]:
    """Every host's list, joined in process order (the list itself with one process)."""
    return [v for host in allgather_json(values) for v in host]


def excluded_everywhere(local: ExcludedEpisodes) -> ExcludedEpisodes:
    """Exclusion counts summed over hosts."""
    total: Counter[str] = Counter()
    for counts in allgather_json(dict(local.counts)):
        total.update(counts)
    return ExcludedEpisodes(total)
