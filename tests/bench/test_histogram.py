"""Latency histogram: buckets, snapshots, merge, quantiles; RateWindow for TPS."""
import msgpack
import pytest

from shard.histogram import (DEFAULT_LATENCY_BOUNDS, Histogram, RateWindow, diff, merge,
                             quantile, summary_ms)


def test_default_bounds_resolve_50us_to_10s():
    assert DEFAULT_LATENCY_BOUNDS[0] == 0.00005
    assert DEFAULT_LATENCY_BOUNDS[-1] == 10.0
    assert list(DEFAULT_LATENCY_BOUNDS) == sorted(set(DEFAULT_LATENCY_BOUNDS))


def test_observe_puts_values_in_le_buckets_with_overflow_last():
    h = Histogram(bounds=(0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.002, 0.01, 0.05, 0.2, 99.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap["bounds"] == [0.001, 0.01, 0.1]
    assert snap["counts"] == [2, 2, 1, 2]          # non-cumulative; last is +Inf
    assert snap["count"] == 7
    assert snap["sum"] == pytest.approx(0.0005 + 0.001 + 0.002 + 0.01 + 0.05 + 0.2 + 99.0)


def test_snapshot_is_a_copy_and_survives_msgpack():
    h = Histogram()
    h.observe(0.0003)
    snap = h.snapshot()
    h.observe(0.0003)
    assert snap["count"] == 1
    assert msgpack.unpackb(msgpack.packb(snap)) == snap


def test_bad_bounds_are_refused():
    for bounds in ((), (0.1, 0.1), (0.2, 0.1), (0.0, 1.0)):
        with pytest.raises(ValueError):
            Histogram(bounds=bounds)


def test_quantile_interpolates_linearly_within_a_bucket():
    h = Histogram(bounds=(1.0, 2.0, 4.0))
    for _ in range(10):
        h.observe(1.5)                             # all in (1, 2]
    snap = h.snapshot()
    assert quantile(snap, 0.5) == pytest.approx(1.5)
    assert quantile(snap, 0.1) == pytest.approx(1.1)
    assert quantile(snap, 1.0) == pytest.approx(2.0)
    assert quantile(snap, 0.0) == pytest.approx(1.0)


def test_quantile_walks_buckets_and_handles_first_and_overflow():
    h = Histogram(bounds=(1.0, 2.0))
    for v in [0.5] * 50 + [1.5] * 40 + [3.0] * 10:
        h.observe(v)
    snap = h.snapshot()
    assert quantile(snap, 0.25) == pytest.approx(0.5)       # first bucket from 0
    assert quantile(snap, 0.70) == pytest.approx(1.5)       # 20 of 40 into (1, 2]
    assert quantile(snap, 0.99) == 2.0                      # overflow: highest finite bound
    assert quantile(Histogram().snapshot(), 0.99) == 0.0    # empty
    with pytest.raises(ValueError):
        quantile(snap, 1.5)


def test_quantiles_track_real_latencies_within_a_bucket():
    h = Histogram()
    values = [0.0002] * 900 + [0.003] * 90 + [0.04] * 10
    for v in values:
        h.observe(v)
    snap = h.snapshot()
    assert 0.0001 < quantile(snap, 0.5) <= 0.00025
    assert 0.0025 < quantile(snap, 0.95) <= 0.005
    assert 0.025 < quantile(snap, 0.999) <= 0.05
    ms = summary_ms(snap)
    assert set(ms) == {"latency_p50_ms", "latency_p90_ms", "latency_p99_ms"}
    assert ms["latency_p50_ms"] < ms["latency_p90_ms"] < ms["latency_p99_ms"]


def test_merge_and_diff():
    a, b = Histogram(), Histogram()
    a.observe(0.001)
    b.observe(0.001)
    b.observe(2.0)
    m = merge(a.snapshot(), b.snapshot())
    assert m["count"] == 3 and sum(m["counts"]) == 3
    assert m["sum"] == pytest.approx(2.002)
    d = diff(m, a.snapshot())
    assert d["counts"] == b.snapshot()["counts"] and d["count"] == 2
    with pytest.raises(ValueError):
        merge(a.snapshot(), Histogram(bounds=(1.0,)).snapshot())


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_window_counts_events_over_the_window_only():
    clock = FakeClock()
    r = RateWindow(window_secs=10, resolution_secs=1, clock=clock)
    for _ in range(10):                   # 100 events/s for 10 s
        r.add(100)
        clock.now += 1
    assert r.rate() == pytest.approx(100, rel=0.11)
    clock.now += 30                       # idle longer than the window
    assert r.rate() == 0.0
    r.add(5)                              # at 1040: the kept slots cover 1031..1040
    assert r.rate() == pytest.approx(5 / 9)


def test_rate_window_reads_a_steady_rate_exactly():
    """_expire keeps the slots of the last window - resolution to window seconds; rate()
    divided by the full window and read 950-995 at a steady 1000/s (an audit)."""
    clock = FakeClock()
    r = RateWindow(window_secs=10, resolution_secs=0.5, clock=clock)   # the router's
    start, readings = clock.now, []
    for ms in range(30_000):              # 1000 events/s for 30 s
        clock.now = start + ms / 1000
        r.add(1)
        if ms >= 20_000 and ms % 50 == 0:
            readings.append(r.rate())
    assert min(readings) == pytest.approx(1000, rel=1e-3)
    assert max(readings) == pytest.approx(1000, rel=1e-3)


def test_rate_window_early_rate_uses_elapsed_time():
    clock = FakeClock()
    r = RateWindow(window_secs=10, resolution_secs=0.5, clock=clock)
    clock.now += 2
    r.add(200)
    assert r.rate() == pytest.approx(100)


def test_rate_window_memory_is_bounded():
    clock = FakeClock()
    r = RateWindow(window_secs=2, resolution_secs=0.5, clock=clock)
    for _ in range(1000):
        r.add(1)
        clock.now += 0.1
    assert len(r._buckets) <= 5
