"""Benchmarks of the train step: analytic per-device memory (`estimate_memory`) and mesh layouts
(`bench_layouts`), with XLA's compiled memory analysis as the reference."""

from .estimate import MemoryEstimate, estimate_memory, parse_mesh, xla_peak_bytes
from .state_bytes import StateBytes, state_bytes

__all__ = ["MemoryEstimate", "StateBytes", "estimate_memory", "parse_mesh", "state_bytes", "xla_peak_bytes"]
