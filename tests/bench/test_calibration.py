"""The estimate against XLA's compiled memory analysis of the real learner step on 8 fake CPU devices.

XLA peak = argument + output − alias + temp (`xla_peak_bytes`). On XLA:CPU recomputation is hoisted
("eager"), which is what the cpu backend estimates; with tensor parallelism and remat the CPU schedule
lands between the lazy and eager models, which is asserted as a bracket.
"""

from __future__ import annotations

import pytest

from gsjax.bench.compiled import compile_step, compiled_peak_bytes, make_learner
from gsjax.bench.estimate import estimate_memory, parse_mesh

from .helpers import NEEDS_8, calibration_config

pytestmark = NEEDS_8

# (mesh, remat, seq, config overrides): all three layouts, remat none and full, two lengths, a wider
# 4-layer model and the chunked kernel.
WITHIN_10_PERCENT = [
    ("fsdp=8", "none", 512, {}),
    ("fsdp=8", "full", 1024, {}),
    ("data=2,fsdp=4", "none", 1024, {}),
    ("data=2,fsdp=4", "full", 512, {}),
    ("fsdp=4,tensor=2", "none", 512, {}),
    ("fsdp=4,tensor=2", "none", 1024, {"layers": 4, "hidden": 768, "inter": 2048, "vocab": 8192}),
    ("fsdp=8", "full", 1024, {"layers": 4, "hidden": 768, "inter": 2048, "vocab": 8192}),
    ("fsdp=8", "none", 1024, {"attention": "chunked"}),
    ("fsdp=4,tensor=2", "none", 1024, {"attention": "chunked"}),
]


def _xla_and_estimate(mesh: str, remat: str, seq: int, overrides: dict, recompute: str | None = None,
                      logits_chunk: int = 0):
    config = calibration_config(remat=remat, **overrides)
    learner = make_learner(config, parse_mesh(mesh), logits_chunk=logits_chunk)
    xla = compiled_peak_bytes(compile_step(config, learner, 8, seq))
    est = estimate_memory(config, parse_mesh(mesh), 8, seq, backend="cpu", recompute=recompute,
                          logits_chunk=logits_chunk)
    return xla, est


@pytest.mark.parametrize("mesh, remat, seq, overrides", WITHIN_10_PERCENT)
def test_estimate_within_10_percent_of_xla(mesh, remat, seq, overrides):
    xla, est = _xla_and_estimate(mesh, remat, seq, overrides)
    assert xla is not None
    error = (est.total - xla) / xla
    print(f"{mesh} remat={remat} seq={seq} {overrides}: xla={xla / 2**20:.1f} MiB "
          f"estimate={est.total / 2**20:.1f} MiB error={error * 100:+.1f}%")
    assert abs(error) < 0.10


@pytest.mark.parametrize("mesh, remat, chunk", [("fsdp=8", "full", 128), ("fsdp=4,tensor=2", "none", 256)])
def test_chunked_lm_head_estimate_within_10_percent_of_xla(mesh, remat, chunk):
    """train.logits_chunk: one (rows, chunk, V) logits block live, plus the head gradient carried by the scan."""
    xla, est = _xla_and_estimate(mesh, remat, 1024, {}, logits_chunk=chunk)
    unchunked = estimate_memory(calibration_config(remat=remat), parse_mesh(mesh), 8, 1024, backend="cpu")
    assert est.activations.head < unchunked.activations.head
    assert abs(est.total - xla) / xla < 0.10


def test_state_is_exactly_the_compiled_arguments():
    """Params + frozen + optimizer equal XLA's argument bytes up to the batch arrays and step/rng."""
    config = calibration_config()
    learner = make_learner(config, parse_mesh("fsdp=4,tensor=2"))
    stats = compile_step(config, learner, 8, 512).memory_analysis()
    est = estimate_memory(config, parse_mesh("fsdp=4,tensor=2"), 8, 512, backend="cpu")
    batch_bytes = 2 * 512 * (4 + 1 + 4 + 4 + 3 * 4)  # 2 rows per device: ids, mask, targets, weights, positions
    assert stats.argument_size_in_bytes - est.state == pytest.approx(batch_bytes, abs=64)


def test_tensor_parallel_remat_lies_between_lazy_and_eager():
    xla, eager = _xla_and_estimate("fsdp=4,tensor=2", "full", 512, {})
    lazy = estimate_memory(calibration_config(remat="full"), parse_mesh("fsdp=4,tensor=2"), 8, 512,
                           backend="cpu", recompute="lazy")
    print(f"fsdp=4,tensor=2 remat=full: lazy {(lazy.total - xla) / xla * 100:+.1f}%, "
          f"eager {(eager.total - xla) / xla * 100:+.1f}%")
    assert lazy.total < xla < eager.total
