"""Stop training on a non-finite loss or gradient norm before the state is checkpointed or pushed to the
rollout engine: after one such update every parameter is NaN, and every later step would train on nothing
while looking normal in the step counter."""

from __future__ import annotations

import math
from collections.abc import Mapping

CHECKED = ("loss", "grad_norm")
"""The figures of an update that must be finite."""


class NonFiniteTraining(RuntimeError):
    """The update at `step` produced a non-finite loss or gradient norm; nothing from it was saved."""

    def __init__(self, step: int, values: Mapping[str, float], last_checkpoint: int | None):
        self.step, self.values, self.last_checkpoint = step, dict(values), last_checkpoint
        saved = "" if last_checkpoint is None else f" (the last checkpoint is step {last_checkpoint})"
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        super().__init__(f"update {step} gave non-finite {shown}; its state was not saved{saved}. Look at this "
                         f"step's data (an image past runtime.vision_max_frame_rows poisons the batch with NaN) or "
                         f"lower the learning rate, then resume")


def check_finite(step: int, metrics: Mapping[str, float], keys: tuple[str, ...] = CHECKED,
                 last_checkpoint: int | None = None) -> None:
    """Raise `NonFiniteTraining` if any of `keys` present in `metrics` is NaN or infinite."""
    bad = {k: float(metrics[k]) for k in keys if k in metrics and not math.isfinite(float(metrics[k]))}
    if bad:
        raise NonFiniteTraining(step, bad, last_checkpoint)
