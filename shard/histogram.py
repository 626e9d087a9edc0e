"""Fixed-bucket latency histogram with quantiles, and a sliding rate window for TPS.

Shared by the shard worker (commit latency) and the router (request latency). A snapshot
is a plain dict, so it travels in msgpack stats messages and maps 1:1 onto a Prometheus
histogram (cumulate the counts, add +Inf):

    {"bounds": [b0, b1, ...],          # upper bounds in seconds, increasing
     "counts": [c0, c1, ..., c_inf],   # per bucket, NOT cumulative; len(bounds) + 1
     "sum": float, "count": int}

Bucket i holds observations in (bounds[i-1], bounds[i]]; the last one is the +Inf overflow.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque

# 50us .. 10s, roughly 1-2.5-5 steps: fine enough for sub-millisecond commit latency and
# coarse enough that a snapshot stays a few hundred bytes.
DEFAULT_LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Histogram:
    """Counts observations (seconds) into fixed buckets; observe() is one bisect."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds=DEFAULT_LATENCY_BOUNDS):
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(b <= a for a, b in zip(bounds, bounds[1:])) or bounds[0] <= 0:
            raise ValueError(f"histogram bounds must be positive and strictly increasing: {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le semantics).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts),
                "sum": self.sum, "count": self.count}

    def reset(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def quantile(self, q: float) -> float:
        return quantile(self.snapshot(), q)


def empty_snapshot(bounds=DEFAULT_LATENCY_BOUNDS) -> dict:
    return Histogram(bounds).snapshot()


def merge(a: dict, b: dict) -> dict:
    """Sum of two snapshots with the same bounds (e.g. all shards, or across restarts)."""
    if list(a["bounds"]) != list(b["bounds"]):
        raise ValueError("cannot merge histograms with different bounds")
    return {"bounds": list(a["bounds"]),
            "counts": [x + y for x, y in zip(a["counts"], b["counts"])],
            "sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}


def diff(newer: dict, older: dict) -> dict:
    """Observations in `newer` that are not in `older` (a window between two snapshots)."""
    if list(newer["bounds"]) != list(older["bounds"]):
        raise ValueError("cannot diff histograms with different bounds")
    return {"bounds": list(newer["bounds"]),
            "counts": [max(0, x - y) for x, y in zip(newer["counts"], older["counts"])],
            "sum": max(0.0, newer["sum"] - older["sum"]),
            "count": max(0, newer["count"] - older["count"])}


def quantile(snapshot: dict, q: float) -> float:
    """Estimated q-quantile in seconds, interpolating linearly inside the bucket.

    0.0 for an empty histogram. The first bucket interpolates from 0; an observation in
    the +Inf bucket is reported as the highest finite bound (the true value is unknown).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    counts, bounds = snapshot["counts"], snapshot["bounds"]
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i]
            return lower + (upper - lower) * max(0.0, rank - seen) / c
        seen += c
    return float(bounds[-1])


def summary_ms(snapshot: dict) -> dict:
    """The p50/p90/p99 fields of the stats snapshot, in milliseconds."""
    return {f"latency_p{p}_ms": quantile(snapshot, p / 100) * 1000.0 for p in (50, 90, 99)}


class RateWindow:
    """Events per second over the last `window_secs` (e.g. committed txns -> TPS).

    Counts are kept in one-second-or-finer buckets, so memory is bounded by the window,
    not by the event rate.
    """

    def __init__(self, window_secs: float = 10.0, resolution_secs: float = 0.5, clock=time.monotonic):
        if window_secs <= 0 or resolution_secs <= 0 or resolution_secs > window_secs:
            raise ValueError("need 0 < resolution_secs <= window_secs")
        self.window = float(window_secs)
        self.resolution = float(resolution_secs)
        self._clock = clock
        self._buckets: deque[list] = deque()     # [slot_index, count], oldest first
        self._started = clock()

    def add(self, n: int = 1, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        slot = int(now // self.resolution)
        if self._buckets and self._buckets[-1][0] == slot:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([slot, n])
        self._expire(now)

    def rate(self, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        oldest = self._expire(now)
        # Divide by the time the kept slots cover: from the first slot _expire keeps (or
        # the start, until a full window has passed) to now, between window - resolution
        # and window seconds. Dividing by the window read up to a slot's worth low.
        since = max(self._started, (oldest + 1) * self.resolution)
        return sum(c for _, c in self._buckets) / max(now - since, self.resolution)

    def _expire(self, now: float) -> int:
        """Drop every slot that starts a window or more before now; returns the index of
        the last such slot."""
        oldest = int((now - self.window) // self.resolution)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()
        return oldest
