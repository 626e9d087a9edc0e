"""Which shard each key of a request goes to: crc32(key) % shards.

The router's hot path routes every key of every `get` and `batch`. `route_batch` and
`group_keys` do it for a whole request at once, in C when the install built
node/_routing.c (optional, like the other C helpers), else with the Python reference
below; ROUTING says which. tests/node/test_routing.py holds the C ones to the reference.
"""
from __future__ import annotations

import zlib


def shard_of(key: bytes, shards: int) -> int:
    return zlib.crc32(key) % shards


def parts_by_shard(reads, writes, rshards, wshards) -> dict:
    """{shard: (reads, writes)} of one txn, given the shard of each read and write."""
    parts = {}
    for s, kv in zip(rshards, reads):
        part = parts.get(s)
        if part is None:
            part = parts[s] = ([], [])
        part[0].append(kv)
    for s, kv in zip(wshards, writes):
        part = parts.get(s)
        if part is None:
            part = parts[s] = ([], [])
        part[1].append(kv)
    return parts


def shares_keys(txns) -> bool:
    """Whether some key is read or written by two different entries of a batch."""
    first = {}
    setdefault = first.setdefault
    for i, t in enumerate(txns):
        for k, _ in t["reads"]:
            if setdefault(k, i) != i:
                return True
        for k, _ in t["writes"]:
            if setdefault(k, i) != i:
                return True
    return False


def py_route_batch(txns: list, shards: int) -> list | None:
    """Per entry of a batch: the shard all its keys are on (-1 when it has none), or
    {shard: (reads, writes)} when they are on several. None when some key is read or
    written by two different entries (the router then dispatches entry by entry)."""
    if shards < 1:
        raise ValueError("nshards must be >= 1")
    if shares_keys(txns):
        return None
    crc = zlib.crc32
    routes = []
    for t in txns:
        reads, writes = t["reads"], t["writes"]
        rshards = [crc(k) % shards for k, _ in reads]
        wshards = [crc(k) % shards for k, _ in writes]
        where = set(rshards)
        where.update(wshards)
        if len(where) <= 1:
            routes.append(where.pop() if where else -1)
        else:
            routes.append(parts_by_shard(reads, writes, rshards, wshards))
    return routes


def py_group_keys(keys: list, shards: int) -> dict:
    """{shard: ([index in keys, ...], [key, ...])} for the keys of a `get`."""
    if shards < 1:
        raise ValueError("nshards must be >= 1")
    groups = {}
    crc = zlib.crc32
    for i, key in enumerate(keys):
        s = crc(key) % shards
        group = groups.get(s)
        if group is None:
            group = groups[s] = ([], [])
        group[0].append(i)
        group[1].append(key)
    return groups


# -- the keys of undecided 2PC txns (node/coordinator.py: a txn touching one waits)

def py_first_locked(txns: list, start: int, locked: dict) -> int:
    """The index of the first entry from `start` that reads or writes a key in
    `locked`, or -1."""
    for i in range(max(start, 0), len(txns)):
        t = txns[i]
        if any(k in locked for k, _ in t["reads"]) or any(k in locked for k, _ in t["writes"]):
            return i
    return -1


def py_lock_parts(locked: dict, written: dict, parts: dict, txn) -> None:
    """locked[key] = txn for every key of parts ({shard: (reads, writes)}), and
    written[key] = txn for every key it writes."""
    for reads, writes in parts.values():
        for k, _ in reads:
            locked[k] = txn
        for k, _ in writes:
            locked[k] = txn
            written[k] = txn


def py_unlock_parts(locked: dict, written: dict, parts: dict) -> None:
    """Every key of parts out of locked and written."""
    for reads, writes in parts.values():
        for k, _ in reads:
            locked.pop(k, None)
        for k, _ in writes:
            locked.pop(k, None)
            written.pop(k, None)


try:
    from node._routing import group_keys as native_group_keys, route_batch as native_route_batch
    from node._routing import first_locked as native_first_locked
    from node._routing import lock_parts as native_lock_parts, unlock_parts as native_unlock_parts
except ImportError:  # built without a C compiler, or an older build
    native_group_keys = native_route_batch = None
    native_first_locked = native_lock_parts = native_unlock_parts = None

ROUTING = "native" if native_route_batch is not None else "python"
route_batch = native_route_batch or py_route_batch
group_keys = native_group_keys or py_group_keys
first_locked = native_first_locked or py_first_locked
lock_parts = native_lock_parts or py_lock_parts
unlock_parts = native_unlock_parts or py_unlock_parts
