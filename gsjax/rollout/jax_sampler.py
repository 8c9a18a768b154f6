"""The embedded JAX sampler: the default `RolloutEngine`, in-process, on CPU, GPU or TPU.

Requests from any thread or event loop go into an inbox; one background thread owns the device and runs
continuous batching by slot refill: at every step boundary it admits waiting requests into free slots
(one batched prefill per admission group), dispatches one decode step of all slots, and reads the
previous step's tokens while the device computes the next one (one step in flight), so the host work
of stop checks and bookkeeping overlaps device time. A finished request frees its slot at once.

Prefix reuse (multi-turn rollouts): a finished request's keys/values stay in its slot; a later request whose
prompt starts with that history (the agent's next turn: the same ids plus the tool response) is admitted into
that slot and only its new suffix is prefilled. Requests that match nothing go to empty slots first, then to
the slot whose prefix is oldest. A weight update makes every retained prefix stale (reused only under the
version that computed it).

Weight updates swap the parameters between two steps: requests in flight continue on the new weights
(their cached keys/values were computed by the old ones); each result names the version of its last
token and lists every version that produced some of its tokens in `extra["weight_versions"]`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gsjax.models.qwen3_vl.attention import decode_block
from gsjax.models.qwen3_vl.checkpoint import load_hf
from gsjax.models.qwen3_vl.config import Qwen3VLConfig, RuntimeConfig
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.parallel.sharding import DEFAULT_RULES, Rules, param_shardings

from .batch_decoder import BatchDecoder, batch_parallelism
from .engine import EngineError, GenerationRequest, GenerationResult
from .sampling import batch_mode
from .slots import (
    Decoding,
    RetainedPrefix,
    build_prefill,
    fit_bucket,
    power_buckets,
    prepare,
    reusable_length,
    split_buckets,
    take_group,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerConfig:
    """Static shapes of the sampler: every compiled program is one of these buckets."""

    max_slots: int = 16  # sequences decoded together (the decode batch)
    max_total_len: int = 4096  # KV cache length per slot: prompt + output tokens
    min_prefill_bucket: int = 64  # prompt lengths are padded to powers of two from here up to max_total_len
    min_prefill_rows: int = 1  # prefill row counts are padded to powers of two from here up to max_slots
    max_prefill_tokens: int = 16384  # padded prompt tokens per prefill call (rows × length bucket)
    min_vision_rows: int = 256  # image patch rows are padded to powers of two from here
    decode_window_splits: int = 2  # decode windows: the prefill buckets with each octave cut in this many steps
    prefix_reuse: bool = True  # keep finished requests' keys/values and prefill only the new suffix of a next turn
    min_reuse_tokens: int = 32  # shorter common prefixes are prefilled again (not worth a second program)

    def validate(self, batch_parallelism: int) -> None:
        if self.max_slots < 1 or self.max_slots % batch_parallelism:
            raise ValueError(f"max_slots={self.max_slots} must be a positive multiple of the {batch_parallelism} "
                             f"devices that split the batch")
        if self.max_total_len < 2 or self.min_prefill_bucket < 1:
            raise ValueError("max_total_len must be >= 2 and min_prefill_bucket >= 1")
        if not 1 <= self.min_prefill_rows <= self.max_slots:
            raise ValueError(f"min_prefill_rows={self.min_prefill_rows} must be in [1, max_slots={self.max_slots}]")
        if self.decode_window_splits < 1:
            raise ValueError(f"decode_window_splits must be >= 1, got {self.decode_window_splits}")
        if self.min_reuse_tokens < 1:
            raise ValueError(f"min_reuse_tokens must be >= 1, got {self.min_reuse_tokens}")


@dataclass
class SamplerStats:
    """Counters of the decode loop (read them for tests and monitoring)."""

    prefill_calls: int = 0
    prefill_rows: int = 0  # requests admitted
    prefill_tokens: int = 0  # prompt tokens computed by prefills
    reused_rows: int = 0  # requests admitted onto a retained prefix
    reused_tokens: int = 0  # prompt tokens taken from retained prefixes instead of being computed
    decode_steps: int = 0
    tokens: int = 0  # output tokens delivered
    peak_live: int = 0  # most slots busy at one step
    # where the decode loop's time goes: waiting for requests (the callers are the bottleneck), waiting for
    # the device's results (the model is), and the rest is host work (scheduling, batching, dispatch)
    idle_s: float = 0.0
    device_wait_s: float = 0.0


@dataclass(eq=False)
class _Event:
    """A dispatched device call whose outputs the host has not read yet."""

    rows: list[tuple[int, Decoding]]  # (output row, request) pairs
    tokens: jax.Array
    logprobs: jax.Array
    version: str


_CLOSE = object()


class JaxSampler:
    """`RolloutEngine` over a `Qwen3VL` (or an HF checkpoint directory), optionally sharded over a mesh."""

    def __init__(self, model: Qwen3VL | str | Path, config: SamplerConfig | None = None, *,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, runtime: RuntimeConfig | None = None,
                 weight_version: str = "0"):
        self.config = c = config or SamplerConfig()
        parallel = batch_parallelism(mesh, rules)
        c.validate(parallel)
        if not isinstance(model, Qwen3VL):
            model = _load(Path(model), runtime, mesh, rules)
        self.model_config: Qwen3VLConfig = model.config
        self.decoder = BatchDecoder(model, c.max_slots, c.max_total_len, mesh=mesh, rules=rules,
                                    version=weight_version)
        # fewer row buckets, fewer compiled prefill programs (each padded row costs a little compute)
        self.row_buckets = power_buckets(max(parallel, c.min_prefill_rows), c.max_slots, multiple=parallel)
        self.length_buckets = power_buckets(min(c.min_prefill_bucket, c.max_total_len), c.max_total_len)
        # a prefill onto a reused prefix, and a decode step, attend over the smallest of these that holds the
        # longest row: one compile per bucket. Where the decode kernel itself visits only the blocks of live keys
        # (CPU), a decode step takes the whole cache: one compiled program, no window copied out.
        self.window_buckets = split_buckets(self.length_buckets, c.decode_window_splits)
        runtime = self.model_config.runtime
        blocked = decode_block(runtime.attention_impl, runtime.attention_chunk, c.max_total_len) is not None
        self.decode_windows = (c.max_total_len,) if blocked else self.window_buckets
        self.stats = SamplerStats()
        self._idle_since: float | None = None  # when the loop began waiting for requests (None: busy)
        self._slots: list[Decoding | None] = [None] * c.max_slots
        self._retained: list[RetainedPrefix | None] = [None] * c.max_slots
        self._retained_at = [0] * c.max_slots  # when each slot's prefix was left (older ones are evicted first)
        self._clock = 0
        self._pending: deque[Decoding] = deque()
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jax-sampler", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- RolloutEngine
    @property
    def weight_version(self) -> str:
        return self.decoder.version

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await asyncio.wrap_future(self.submit([request])[0])

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        futures = self.submit(requests)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def update_weights(self, params: Any, version: str) -> None:
        """New weights from an nnx.State (all or some of the model's params, by path) or an HF directory."""
        if isinstance(params, (str, Path)):
            fresh = _load(Path(params), self.model_config.runtime, self.decoder.mesh, self.decoder.rules,
                          self.model_config)
            self.decoder.set_params(nnx.state(fresh, nnx.Param), version, copy=False)
        else:
            self.decoder.set_params(params, version)

    def __enter__(self) -> JaxSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the loop; requests not finished yet complete with finish_reason "abort"."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_CLOSE)
        self._thread.join()

    # ---------------------------------------------------------------- blocking API
    def submit(self, requests: Sequence[GenerationRequest]) -> list[Future]:
        """Queue requests (admitted together when slots allow); each future resolves to its result.

        A malformed request raises EngineError here, before anything is queued.
        """
        if self._closed or self._error is not None:
            raise EngineError(f"sampler is closed{f' after an error: {self._error!r}' if self._error else ''}")
        c = self.config
        seqs = [prepare(self.model_config, r, Future(), max(self.length_buckets), c.max_total_len)
                for r in requests]
        self._inbox.put(seqs)
        return [s.future for s in seqs]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Blocking `generate_many` for scripts and benchmarks."""
        return [f.result() for f in self.submit(requests)]

    def compilations(self) -> dict[str, int]:
        return self.decoder.compilations()

    @property
    def waiting_for_requests(self) -> bool:
        """True while the loop blocks on an empty inbox (every earlier step read back, nothing in flight)."""
        return self._idle_since is not None

    def idle_seconds(self) -> float:
        """`stats.idle_s` plus the wait in progress, so a reading taken while the loop waits is current."""
        since = self._idle_since
        return self.stats.idle_s + (time.perf_counter() - since if since is not None else 0.0)

    # ---------------------------------------------------------------- decode loop (background thread)
    def _run(self) -> None:
        events: deque[_Event] = deque()
        try:
            while self._receive(block=not (events or self._pending or self._live())):
                self._admit(events)
                if self._live():
                    events.append(self._decode())
                    while len(events) > 1:  # keep the newest step in flight while reading the older ones
                        self._read(events.popleft())
                else:
                    while events:
                        self._read(events.popleft())
        except BaseException as err:  # a device or program failure: fail everything, refuse new work
            log.exception("sampler loop failed")
            self._error = err
        self._abort_all()

    def _receive(self, block: bool) -> bool:
        """Move requests from the inbox to the pending queue; False once close() was called."""
        items = []
        if block:  # one blocking wait (no polling: waking threads would contend for the GIL)
            self._idle_since = time.perf_counter()
            items.append(self._inbox.get())
            waited, self._idle_since = time.perf_counter() - self._idle_since, None
            self.stats.idle_s += waited
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is _CLOSE:
                return False
            self._pending.extend(item)
        return True

    def _live(self) -> bool:
        return any(s is not None for s in self._slots)

    def _admit(self, events: deque[_Event]) -> None:
        """Prefill waiting requests into free slots: per admission group, one batched call for the requests
        that continue a retained prefix and one for the rest."""
        while self._pending:
            if self._pending[0].future.cancelled():
                self._pending.popleft()
                continue
            free = [i for i, s in enumerate(self._slots) if s is None]
            if not free:
                return
            self._place(list(self._pending)[:len(free)], free)
            group = take_group(list(self._pending), len(free), self.row_buckets, self.length_buckets,
                               self.config.max_prefill_tokens)
            for seq in group:
                self._pending.popleft()
                self._slots[seq.slot] = seq
                self._retained[seq.slot] = None
            for seq in self._pending:  # placed but not taken: matched again at the next admission
                seq.slot, seq.reuse, seq.inherited_versions = -1, 0, ()
            fresh, extend, window = self._split_by_reuse(group)
            for part, part_window in ((fresh, None), (extend, window)):
                if part:
                    self._prefill(part, part_window, events)

    def _place(self, head: list[Decoding], free: list[int]) -> None:
        """Pick each head request's slot: first, in FIFO order, the free slot whose retained prefix it extends
        furthest; then, for requests that extend none, an empty slot, else the one holding the oldest prefix
        (so they never take a prefix that a later request of the same admission reuses). Sets `slot` and
        `reuse`."""
        free = list(free)
        version = self.decoder.version
        unmatched = []
        for seq in head:
            best, reuse = None, 0
            if self.config.prefix_reuse:
                for slot in free:
                    n = reusable_length(self._retained[slot], seq, version)
                    if n >= self.config.min_reuse_tokens and n > reuse:
                        best, reuse = slot, n
            if best is None:
                unmatched.append(seq)
                continue
            free.remove(best)
            seq.slot, seq.reuse, seq.inherited_versions = best, reuse, self._retained[best].versions
        for seq in unmatched:
            best = min(free, key=lambda i: (self._retained[i] is not None, self._retained_at[i]))
            free.remove(best)
            seq.slot, seq.reuse, seq.inherited_versions = best, 0, ()

    def _split_by_reuse(self, group: list[Decoding]) -> tuple[list[Decoding], list[Decoding], int | None]:
        """(fresh rows, rows that continue a prefix, the prefill window of the latter). A row whose prefix plus
        the group's padded suffix would overflow its cache row is prefilled fresh instead."""
        extend = sorted((s for s in group if s.reuse), key=lambda s: s.reuse)
        while extend:
            suffix = fit_bucket(max(s.prefill_length for s in extend), self.length_buckets)
            if extend[-1].reuse + suffix <= self.config.max_total_len:
                window = fit_bucket(extend[-1].reuse + suffix, self.window_buckets)
                return [s for s in group if not s.reuse], extend, window
            dropped = extend.pop()
            dropped.reuse, dropped.inherited_versions = 0, ()
        return list(group), [], None

    def _prefill(self, group: list[Decoding], window: int | None, events: deque[_Event]) -> None:
        rows = fit_bucket(len(group), self.row_buckets)
        length = fit_bucket(max(s.prefill_length for s in group), self.length_buckets)
        batch = build_prefill(group, rows, length, self.config.max_slots, self.model_config,
                              self.config.min_vision_rows)
        tokens, logprobs, version = self.decoder.prefill(batch, batch_mode(s.request.params for s in group), window)
        events.append(_Event(list(enumerate(group)), tokens, logprobs, version))
        st = self.stats
        st.prefill_calls += 1
        st.prefill_rows += len(group)
        st.prefill_tokens += sum(s.prefill_length for s in group)
        st.reused_rows += sum(1 for s in group if s.reuse)
        st.reused_tokens += sum(s.reuse for s in group)

    def _decode(self) -> _Event:
        live = [(i, s) for i, s in enumerate(self._slots) if s is not None]
        self.stats.decode_steps += 1
        self.stats.peak_live = max(self.stats.peak_live, len(live))
        reach = self._reach(s for _, s in live)
        tokens, logprobs, version = self.decoder.decode(batch_mode(s.request.params for _, s in live),
                                                        fit_bucket(reach, self.decode_windows), reach)
        for _, seq in live:
            seq.decode_steps += 1
        return _Event(live, tokens, logprobs, version)

    def _reach(self, live: Iterable[Decoding]) -> int:
        """How many cache slots this decode step must attend over: the longest live row's cache after it. The
        window is the smallest decode bucket that holds it; the blocked kernel stops there (idle slots, which
        keep advancing, do not count).

        A row already finished but not read back yet may ask for one slot past the cache; its token is
        discarded, so the whole cache is enough.
        """
        return min(max(s.next_cache_length() for s in live), self.config.max_total_len)

    def _read(self, event: _Event) -> None:
        """Hand the event's tokens to their requests; finished requests resolve and free their slots."""
        start = time.perf_counter()
        tokens, logprobs = np.asarray(event.tokens), np.asarray(event.logprobs)
        self.stats.device_wait_s += time.perf_counter() - start
        for row, seq in event.rows:
            if seq.done:  # finished in an earlier event; this token was computed speculatively
                continue
            if seq.future.cancelled():
                seq.finish = "abort"
            elif not seq.accept(int(tokens[row]), float(logprobs[row]), event.version):
                continue
            self.stats.tokens += len(seq.tokens)
            self._slots[seq.slot] = None
            keep = self.config.prefix_reuse
            self._retained[seq.slot] = RetainedPrefix.of(seq, self.config.max_total_len) if keep else None
            self._clock += 1
            self._retained_at[seq.slot] = self._clock
            _resolve(seq)

    def _abort_all(self) -> None:
        seqs = [s for s in self._slots if s is not None] + list(self._pending)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _CLOSE:
                seqs.extend(item)
        self._slots = [None] * self.config.max_slots
        self._retained = [None] * self.config.max_slots
        self._pending.clear()
        for seq in seqs:
            if self._error is not None:
                if not seq.future.done():
                    seq.future.set_exception(EngineError(f"sampler loop failed: {self._error!r}"))
                continue
            seq.finish = seq.finish or "abort"
            _resolve(seq)


def _resolve(seq: Decoding) -> None:
    if not seq.future.done():
        seq.future.set_result(seq.result())


def _load(directory: Path, runtime: RuntimeConfig | None, mesh: Mesh | None, rules: Rules,
          config: Qwen3VLConfig | None = None) -> Qwen3VL:
    """An HF checkpoint read tensor by tensor straight into its layout on the mesh (no full host copy)."""
    if mesh is None:
        return load_hf(directory, runtime=runtime, config=config)
    cfg = config or Qwen3VLConfig.from_file(directory, runtime)
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
    shardings = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(param_shardings(abstract,
                                                                                                   mesh, rules))}

    def place(path: str, array: np.ndarray, dtype) -> jax.Array:
        return jax.device_put(np.asarray(array).astype(dtype), shardings[path])

    return load_hf(directory, config=cfg, place=place)
