"""Busy polling: a short window after traffic in which a loop polls without sleeping.

On this kind of VM, waking a process blocked in poll() costs tens of microseconds, and
a transaction crosses several processes (client -> router -> shard -> router -> client,
a cross-shard one twice more): measured on 2 shards, one txn per round trip, the wake-ups
were about 40% of the P99. So for `window` seconds after its last event the router and
each shard poll with a zero timeout instead of blocking, and give the CPU away
(sched_yield) whenever a poll finds nothing, so a spinning process never holds a core
that runnable work needs. An idle node sleeps as before; the price is up to one core
per process while requests trickle in less than `window` apart.
"""
from __future__ import annotations

import os
import time

# [node] busy_poll_us default (configs/node.toml)
DEFAULT_WINDOW_US = 500


def busy_poll_secs(config: dict) -> float:
    """The window from a node config dict ([node] busy_poll_us), in seconds."""
    return config.get("node", {}).get("busy_poll_us", DEFAULT_WINDOW_US) / 1e6


class BusyPoller:
    """A zmq.Poller's poll(timeout_ms) as a dict {fd_or_socket: flags}, zero-timeout
    while the last event is less than `window_secs` old (0 disables the window)."""

    __slots__ = ("poller", "window", "last_event", "clock", "yield_cpu")

    def __init__(self, poller, window_secs: float, clock=time.monotonic, yield_cpu=os.sched_yield):
        self.poller = poller
        self.window = window_secs
        self.last_event = float("-inf")
        self.clock = clock
        self.yield_cpu = yield_cpu

    def poll(self, timeout_ms: int, spin: bool = True) -> dict:
        """`spin=False`: block as asked even inside the window (the caller's wait is
        deliberate, e.g. background work paced to leave the CPU to others)."""
        if spin and timeout_ms and self.window and self.clock() - self.last_event < self.window:
            events = self.poller.poll(0)
            if not events:
                self.yield_cpu()
                return {}
        else:
            events = self.poller.poll(timeout_ms)
        if events:
            self.last_event = self.clock()
        return dict(events)
