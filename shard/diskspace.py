"""The shard's free-space guard: a shard stops taking writes before its disk is full.

RocksDB puts a database into a read-only error state at the first write that fails for
want of space, and only a reopen clears it; the shard worker then has to restart its
engine from disk (shard/worker.py). So the worker checks the free space of the file
system of its directory (statvfs, a few microseconds) at every timer pass, and while it
is below `[durability] min_free_bytes` the shard refuses new writes (transactions,
blocks, flushes, prunes, checkpoints) with a retryable `unavailable`, still serving reads
and finishing the cross-shard transactions already prepared (their records are a few
bytes). It takes writes again once a quarter more than that is free, so a disk hovering
at the mark does not flip the shard at every check. The reserve also leaves room for
what RocksDB's own threads had started (a memtable flush, a compaction).
"""
from __future__ import annotations

import os

# Writes resume at min_free_bytes * RESUME_FACTOR free.
RESUME_FACTOR = 1.25


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`
    (f_bavail: without the blocks reserved for root, although shards may run as root)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def wal_bytes(path: str) -> int:
    """Size of the RocksDB write-ahead log files (*.log) in the database dir `path`."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.endswith(".log"):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:    # deleted by RocksDB meanwhile
                    pass
    return total


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class DiskGuard:
    """Whether a shard may take writes, by the free space next to its database."""

    def __init__(self, path: str, min_free: int, shard: int):
        self.path = path
        self.min_free = min_free          # 0: the guard is off
        self.shard = shard
        self.free = 0
        self.low = False

    def check(self) -> str | None:
        """Measure; returns a log line when the shard starts or stops refusing writes."""
        try:
            self.free = free_bytes(self.path)
        except OSError:               # the directory is gone: its own errors will say so
            return None
        if self.min_free <= 0:
            return None
        if not self.low and self.free < self.min_free:
            self.low = True
            return f"{self.reason}; free space there (delete checkpoints you no longer need, " \
                   f"`shardkv checkpoint delete NAME`, or other files on that file system)"
        if self.low and self.free >= self.min_free * RESUME_FACTOR:
            self.low = False
            return f"shard {self.shard}: {mib(self.free)} free again: taking writes"
        return None

    @property
    def reason(self) -> str:
        return (f"shard {self.shard}: disk nearly full: {mib(self.free)} free on the file system "
                f"of {self.path}, below [durability] min_free_bytes ({mib(self.min_free)}): "
                f"writes are refused until {mib(int(self.min_free * RESUME_FACTOR))} are free "
                f"(reads are served)")
