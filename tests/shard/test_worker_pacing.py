"""Background work (flush, prune, freeing) yields to requests: a real ShardWorker in this
process, its real Unix socket and RocksDB, driven one loop pass at a time. A slice made
while requests come in is followed by MAINTENANCE_PACE times its duration without one;
with no request, slices run back to back."""
import time

import pytest

from shard import messages as m
from shard import worker as worker_module
from shard.link import FrameClient
from shard.worker import MAINTENANCE_PACE

SLICE_SECS = 0.05        # a slow slice, so the paced window (100 ms) is far above scheduling noise


@pytest.fixture
def shard(booted_worker, request):
    # busy_poll_us 0 unless a test asks (indirect parametrize): each loop_pass below then
    # blocks in poll rather than spinning through a busy-poll window
    busy_poll_us = getattr(request, "param", 0)
    w = booted_worker({"flush": {"flush_on_start": False}, "node": {"busy_poll_us": busy_poll_us}})
    client = FrameClient(w.endpoint)
    slices = []                          # (start, end) of each slice

    def slow_slice():
        started = time.monotonic()
        time.sleep(SLICE_SECS)           # stands in for encoding and writing a chunk
        slices.append((started, time.monotonic()))
    w.maintenance_step = slow_slice
    w.prune_job = {"before": 0, "waiters": []}   # background work is pending
    yield w, client, slices
    w.prune_job = None
    client.stream.close()


def ping(client, rid):
    client.send(m.pack({"op": m.PING, "rid": rid}))      # not answered here: not needed


def test_a_slice_made_while_serving_is_followed_by_a_paced_gap(shard):
    w, client, slices = shard
    w.loop_pass()                       # accepts the connection (no request yet: a slice)
    assert w.maintenance_after == 0.0 and len(slices) == 1
    ping(client, 2)
    w.loop_pass()                       # serves the ping, then one slice
    assert len(slices) == 2
    assert w.maintenance_after >= slices[1][1] + MAINTENANCE_PACE * SLICE_SECS
    ping(client, 3)
    w.loop_pass()                       # a request inside the window: served, no slice
    assert len(slices) == 2
    for _ in range(100):                # the poll waits out the window, then the next slice
        w.loop_pass()
        if len(slices) == 3:
            break
    assert len(slices) == 3
    assert slices[2][0] >= slices[1][1] + MAINTENANCE_PACE * SLICE_SECS


def test_with_no_request_slices_run_back_to_back(shard):
    w, client, slices = shard
    for _ in range(4):
        w.loop_pass()                   # the first accepts the connection
    assert len(slices) == 4
    assert w.maintenance_after == 0.0
    assert w.poll_timeout_ms() == 0     # the next slice is due at once


@pytest.mark.parametrize("shard", [500_000], indirect=True)       # a window longer than the test
def test_the_paced_gap_is_a_blocking_wait_even_inside_a_busy_poll_window(shard):
    """Busy polling would turn the gap left to other processes into a spin on a core."""
    w, client, slices = shard
    w.loop_pass()
    ping(client, 2)
    w.loop_pass()                       # serves the ping (an event: the window is open), then a slice
    timeouts = []
    real_poll = w.waiter.poller.poll
    w.waiter.poller.poll = lambda timeout: timeouts.append(timeout) or real_poll(timeout)
    w.loop_pass()
    assert timeouts and timeouts[0] >= 1    # the paced wait, not poll(0)


def test_the_shard_returns_free_heap_to_the_os_once_a_minute(shard):
    """glibc keeps freed heap pages; a never-restarted shard's RSS crept without
    malloc_trim (worker.MALLOC_TRIM_SECS). The timers trim once per interval, not per pass."""
    w, _client, _slices = shard
    calls = []
    w.malloc_trim = lambda pad: calls.append(pad) or 1
    start = w.next_trim
    w.next_stats = 0.0
    w.run_timers(start - 1.0)
    assert calls == []
    w.next_stats = 0.0
    w.run_timers(start)
    assert calls == [0]
    for dt in (0.3, 1.0, worker_module.MALLOC_TRIM_SECS - 1.0):
        w.next_stats = 0.0
        w.run_timers(start + dt)
    assert calls == [0]
    w.next_stats = 0.0
    w.run_timers(start + worker_module.MALLOC_TRIM_SECS)
    assert calls == [0, 0]


def test_malloc_trim_is_glibcs_here():
    """On glibc (Debian, CI) the shard gets the real malloc_trim; elsewhere it trims nothing."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert worker_module.load_malloc_trim() is not None
