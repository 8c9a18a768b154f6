"""Rendering of a memory estimate as a rich table (kept apart from the arithmetic)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .estimate import GIB, MemoryEstimate


def estimate_rows(result: MemoryEstimate) -> list[tuple[str, int]]:
    """(label, bytes per device) for each part, ending with the total."""
    acts = result.activations
    return [
        ("trainable params", result.params),
        ("frozen params", result.frozen),
        ("optimizer state", result.optimizer),
        ("gradients", result.grads),
        ("layer activations", acts.layers),
        ("gathered layer weights", acts.gathered_weights),
        ("logits / LM head", acts.head),
        ("mask, rope, workspace", acts.other),
        ("total", result.total),
    ]


def estimate_table(result: MemoryEstimate, meta: dict[str, Any]) -> Table:
    title = (f"{meta['model']} on {meta['mesh']}: batch {meta['batch']} × seq {meta['seq']}, remat {meta['remat']}, "
             f"{result.attention_kernel} attention, {result.recompute} recompute")
    table = Table(title=title)
    table.add_column("per device")
    table.add_column("GiB", justify="right")
    for label, value in estimate_rows(result):
        table.add_row(label, f"{value / GIB:.2f}")
    table.caption = (f"{result.trainable_count / 1e9:.3f} B trainable + {result.frozen_count / 1e9:.3f} B frozen "
                     f"parameters; {result.tokens_per_device} tokens per device")
    return table
