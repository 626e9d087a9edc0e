"""Adaptive batch writer: bulk writes in chunks whose size follows measured throughput.

A flush writes many rows with the WAL off. One huge WriteBatch stalls
commits for its whole duration and costs memory; tiny ones waste per-batch overhead. The
writer measures ops/s of every chunk into a sliding window and, once the window is full,
looks at its relative standard deviation (RSD = stdev / mean):

- RSD <= target_rsd: throughput is stable, so grow the chunk by `adjust_up`;
- RSD >  target_rsd: throughput is noisy (compaction, contention), shrink by `adjust_down`
  and clear the window, so one noisy burst shrinks once and the next decision rests on
  `window` fresh measurements at the new size;

always bounded by [min_chunk, max_chunk]. `record()` holds the whole policy and is pure
apart from the optional CSV trace; `write()` only slices rows into chunks and times them.

Configuration comes from the `[batch_writer]` config section; environment variables
override it (handy for benchmarks and field tuning without editing the config):

    SHARDKV_ADAPT_MIN_CHUNK   int   >= 1
    SHARDKV_ADAPT_MAX_CHUNK   int   >= min_chunk
    SHARDKV_ADAPT_TARGET_RSD  fraction ("0.08") or percent ("8%")
    SHARDKV_ADAPT_UP_PCT      percent: "15" or "15%" = 15%; a value below 1 ("0.15") is a fraction
    SHARDKV_ADAPT_DOWN_PCT    percent, same rules; must be below 100%
    SHARDKV_ADAPT_WINDOW      int   >= 2 (chunks per RSD window)
    SHARDKV_ADAPT_CSV         path of a CSV trace, one row per chunk ("" = off)
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

ENV_PREFIX = "SHARDKV_ADAPT_"
log = logging.getLogger(__name__)
CSV_HEADER = ("chunk", "size", "ops_per_sec", "window_rsd", "decision")

Row = tuple[str, bytes, "bytes | None"]


class BatchSink(Protocol):
    """What `AdaptiveBatchWriter.write` needs from storage: one atomic batch per call."""

    def write_batch(self, rows: list[Row], wal: bool) -> None: ...


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected an integer") from None


def _parse_fraction(name: str, text: str) -> float:
    """'0.08' -> 0.08, '8%' -> 0.08."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            return float(raw[:-1]) / 100.0
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a fraction like 0.08 or a percent like 8%") from None


def _parse_pct(name: str, text: str) -> float:
    """'15' or '15%' -> 0.15; values below 1 are already fractions: '0.15' -> 0.15."""
    raw = text.strip()
    try:
        number = float(raw[:-1] if raw.endswith("%") else raw)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a percent like 15 or 15%") from None
    if raw.endswith("%") or number >= 1:
        return number / 100.0
    return number


# env suffix -> (field, parser)
_ENV_FIELDS = {
    "MIN_CHUNK": ("min_chunk", _parse_int),
    "MAX_CHUNK": ("max_chunk", _parse_int),
    "TARGET_RSD": ("target_rsd", _parse_fraction),
    "UP_PCT": ("adjust_up", _parse_pct),
    "DOWN_PCT": ("adjust_down", _parse_pct),
    "WINDOW": ("window", _parse_int),
    "CSV": ("csv", lambda name, text: text),
}


@dataclass
class AdaptiveConfig:
    """Batch writer tuning; defaults are those of the original project."""

    min_chunk: int = 1000
    max_chunk: int = 8000          # rows; also the longest pause a flush step makes in the shard loop
    target_rsd: float = 0.08
    adjust_up: float = 0.15
    adjust_down: float = 0.30
    window: int = 6
    csv: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: Mapping[str, str] | None = None) -> None:
        """Raise ValueError naming the offending setting (or env variable, via `source`)."""
        source = source or {}

        def fail(field: str, why: str) -> None:
            label = source.get(field, f"batch_writer.{field}")
            raise ValueError(f"{label}={getattr(self, field)!r}: {why}")

        for field in ("min_chunk", "max_chunk", "window"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, "must be an integer")
        for field in ("target_rsd", "adjust_up", "adjust_down"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(field, "must be a finite number")
        if not isinstance(self.csv, str):
            fail("csv", "must be a string path")
        if self.min_chunk < 1:
            fail("min_chunk", "must be >= 1")
        if self.max_chunk < self.min_chunk:
            fail("max_chunk", f"must be >= min_chunk ({self.min_chunk})")
        if self.window < 2:
            fail("window", "must be >= 2 (an RSD needs two samples)")
        if self.target_rsd <= 0:
            fail("target_rsd", "must be > 0")
        if self.adjust_up < 0:
            fail("adjust_up", "must be >= 0")
        if not 0 <= self.adjust_down < 1:
            fail("adjust_down", "must be in [0, 1) (a shrink to zero is not a chunk)")

    @classmethod
    def from_dict(cls, section: Mapping | None, environ: Mapping[str, str] = os.environ) -> "AdaptiveConfig":
        """Build from the `[batch_writer]` config section, then apply SHARDKV_ADAPT_* overrides."""
        values = dataclasses.asdict(cls())
        for key, value in (section or {}).items():
            if key not in values:
                raise ValueError(f"batch_writer.{key}: unknown setting (known: {', '.join(values)})")
            values[key] = value
        source: dict[str, str] = {}
        for suffix, (field, parse) in _ENV_FIELDS.items():
            name = ENV_PREFIX + suffix
            text = environ.get(name)
            if text is None:
                continue
            if field != "csv" and not text.strip():
                raise ValueError(f"{name}='': empty value")
            values[field] = parse(name, text)
            source[field] = name
        config = object.__new__(cls)
        for field, value in values.items():
            setattr(config, field, value)
        config.validate(source)
        return config


class AdaptiveBatchWriter:
    """Chooses the next chunk size from measured throughput (see module doc)."""

    def __init__(self, config: AdaptiveConfig | None = None):
        self.config = config or AdaptiveConfig()
        self.chunk_size: int = self.config.min_chunk
        self.chunks = 0                      # chunks recorded so far (CSV chunk index)
        self.last_rsd: float | None = None
        self._window: deque[float] = deque(maxlen=self.config.window)
        self._csv_file = None
        self._csv_writer = None

    # -- policy ---------------------------------------------------------------------------
    def record(self, ops: int, seconds: float) -> str:
        """Account one written chunk; returns "grow", "shrink" or "hold"."""
        if ops < 0 or seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"record(ops={ops}, seconds={seconds}): need ops >= 0 and seconds >= 0")
        # A chunk too quick for the clock still counts, at the clock's resolution.
        rate = ops / max(seconds, 1e-9)
        self._window.append(rate)
        decision, rsd = "hold", None
        if len(self._window) == self._window.maxlen:
            rsd = relative_stdev(self._window)
            if rsd <= self.config.target_rsd:
                decision = self._resize(1.0 + self.config.adjust_up, "grow")
            else:
                decision = self._resize(1.0 - self.config.adjust_down, "shrink")
                self._window.clear()
        self.last_rsd = rsd
        self._trace(ops, rate, rsd, decision)
        self.chunks += 1
        return decision

    def _resize(self, factor: float, direction: str) -> str:
        cfg = self.config
        wanted = int(round(self.chunk_size * factor))
        if direction == "grow" and wanted == self.chunk_size:
            wanted += 1          # small chunks must still be able to grow
        size = max(cfg.min_chunk, min(cfg.max_chunk, wanted))
        if size == self.chunk_size:
            return "hold"        # pinned at a bound
        self.chunk_size = size
        return direction

    # -- CSV trace ------------------------------------------------------------------------
    def _trace(self, ops: int, rate: float, rsd: float | None, decision: str) -> None:
        if not self.config.csv:
            return
        if self._csv_writer is None:
            try:
                self._open_trace()
            except OSError as exc:
                # A trace is a diagnostic: it must never fail the flush or prune it observes.
                log.warning("batch writer CSV trace %r disabled: %s", self.config.csv, exc)
                self.config = dataclasses.replace(self.config, csv="")
                return
        self._csv_writer.writerow(
            (self.chunks, ops, f"{rate:.1f}", "" if rsd is None else f"{rsd:.5f}", decision))
        self._csv_file.flush()

    def _open_trace(self) -> None:
        path = self.config.csv
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fresh = not os.path.exists(path) or os.path.getsize(path) == 0
        self._csv_file = open(path, "a", newline="")
        self._csv_writer = csv.writer(self._csv_file)
        if fresh:
            self._csv_writer.writerow(CSV_HEADER)

    def close(self) -> None:
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = self._csv_writer = None

    # -- writing --------------------------------------------------------------------------
    def write(self, storage, rows: Iterable[Row], wal: bool) -> tuple[int, int]:
        """Write rows as WriteBatches of `chunk_size` rows each; returns (ops, bytes).

        Each chunk is atomic on its own; the whole call is not (callers such as flush make
        the result durable and visible through their own meta record afterwards).
        """
        write_chunk = _chunk_writer(storage)
        total_ops = total_bytes = 0
        chunk: list = []
        chunk_bytes = 0
        for row in rows:
            _, key, value = row
            chunk.append(row)
            chunk_bytes += len(key) + (len(value) if value is not None else 0)
            if len(chunk) >= self.chunk_size:
                self._write_timed(write_chunk, chunk, wal)
                total_ops += len(chunk)
                total_bytes += chunk_bytes
                chunk, chunk_bytes = [], 0
        if chunk:
            self._write_timed(write_chunk, chunk, wal)
            total_ops += len(chunk)
            total_bytes += chunk_bytes
        return total_ops, total_bytes

    def _write_timed(self, write_chunk, chunk: list, wal: bool) -> None:
        started = time.perf_counter()
        write_chunk(chunk, wal)
        elapsed = time.perf_counter() - started
        # A short tail chunk says little about throughput at chunk_size: do not let it vote.
        if len(chunk) >= self.chunk_size:
            self.record(len(chunk), elapsed)


def _chunk_writer(storage):
    """Adapt a storage object to `fn(rows, wal)` writing one atomic batch."""
    if hasattr(storage, "write_batch"):
        return storage.write_batch
    if hasattr(storage, "batch") and hasattr(storage, "write"):
        def write_chunk(rows, wal):
            batch = storage.batch()
            for cf, key, value in rows:
                if value is None:
                    batch.delete(cf, key)
                else:
                    batch.put(cf, key, value)
            storage.write(batch, wal=wal)
        return write_chunk
    raise TypeError(f"{type(storage).__name__} has neither write_batch(rows, wal) nor batch()/write()")


def relative_stdev(samples) -> float:
    """Population stdev / mean; 0 for a constant series, inf when the mean is 0."""
    n = len(samples)
    mean = sum(samples) / n
    if mean == 0:
        return math.inf
    var = sum((x - mean) ** 2 for x in samples) / n
    return math.sqrt(var) / mean
