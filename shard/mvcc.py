"""In-memory version chains and the cache of flushed rows.

Data shape (like ZODB's MappingStorage `{oid: {tid: data}}`, but ordered):

    memtable = {key: [(ts, value | None), ...]}     # ts ascending, None = tombstone

The engine has an *active* memtable (takes new commits) and at most one *frozen* one
(being flushed to the `data` column family). A key's versions are always appended in
increasing ts order: a prepared key is locked, so nobody writes it until its commit
applies. Version 0 / ABSENT means "no version".
"""
from __future__ import annotations

from collections import OrderedDict

ABSENT = (0, None)           # (ts, value): the key has no version at that snapshot


def newest_at(chain: list, at: int):
    """The newest (ts, value) in an ascending chain with ts <= at, else None."""
    last = chain[-1]
    if last[0] <= at:
        return last
    for i in range(len(chain) - 2, -1, -1):
        if chain[i][0] <= at:
            return chain[i]
    return None


def keep_set(ts_desc: list[int], keep: int, pins) -> set[int]:
    """Which versions of one key survive a prune: the `keep` newest, plus for every
    pinned snapshot the newest version at or below it (so that read still answers)."""
    kept = set(ts_desc[:keep])
    for pin in pins:
        for ts in ts_desc:          # newest first
            if ts <= pin:
                kept.add(ts)
                break
    return kept


def horizon_after(ts_desc: list[int], kept: set[int]) -> int:
    """The lowest snapshot at which this key still reads correctly after dropping the
    versions not in `kept`: the ts of the kept version just above the newest dropped one
    (0 when nothing is dropped)."""
    horizon = 0
    above = None
    for ts in ts_desc:              # newest first
        if ts in kept:
            above = ts
        elif above is not None:
            return above
        else:
            # a dropped version newer than every kept one never happens (keep >= 1)
            return 0
    return horizon


class RowCache:
    """LRU of the newest on-disk version of keys: key -> (ts, value | None); (0, None)
    records that the key has no row on disk. Bounded by `capacity` keys."""

    __slots__ = ("capacity", "rows", "hits", "misses")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes):
        row = self.rows.get(key)
        if row is not None:
            self.rows.move_to_end(key)
        return row

    def put(self, key: bytes, row: tuple) -> None:
        rows = self.rows
        rows[key] = row
        rows.move_to_end(key)
        if len(rows) > self.capacity:
            rows.popitem(last=False)

    def update_if_present(self, key: bytes, row: tuple) -> None:
        if key in self.rows:
            self.rows[key] = row

    def clear(self) -> None:
        self.rows.clear()

    def __len__(self) -> int:
        return len(self.rows)
