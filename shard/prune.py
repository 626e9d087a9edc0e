"""Incremental prune: keep the `keep` newest versions of every key, in memory and on disk.

Phase 1 (memory): walk the resident keys `step_keys` at a time; a chain longer than
`keep` is *replaced* by its survivors (never shrunk in place: a running flush may be
iterating the old list). Memory versions are newer than disk versions, so keeping the
newest of the resident ones is the same choice as over the whole chain.
Phase 2 (disk): walk the `data` column family `step_keys` user keys at a time; for each
key merge the resident and on-disk version ts, choose the survivors, and delete the
other rows in one WAL-on batch (never the newest disk row of a key unless it is a
tombstone, and never while a flush is unfinished: see _prune_disk) that also records the
raised horizon (so a crash never leaves rows deleted below an old horizon).

Tombstones: a survivor that is a delete with no survivor below it reads exactly as no
row at all (a read of a deleted key answers (None, 0), the same as a key never written),
so it goes too, with every row below it in the same batch (a delete never goes without
what it deleted: the key cannot come back). A deleted key's rows thus leave the disk
entirely once a flush and a prune have seen the delete: a store that creates and
deletes keys all the time does not grow, and scans do not walk dead keys.

Survivors: the `keep` newest plus, for every pinned snapshot, the newest version at or
below it (mvcc.keep_set). Horizon: the oldest snapshot at which every key still reads as
before (mvcc.horizon_after); reads below it get TooOld, except at pinned snapshots.
"""
from __future__ import annotations

import time

from . import commitlog as cl
from .keycodec import TOMBSTONE, split_version_key
from .mvcc import ABSENT, horizon_after, keep_set

_AFTER_ALL_VERSIONS = b"\xff" * 9     # enc(key) + this sorts after every version of key


class PruneJob:
    def __init__(self, engine, keep: int):
        self.engine = engine
        self.keep = keep
        self.step_keys = engine.config.prune_step_keys
        self.started = time.monotonic()
        self.removed = 0
        keys = set(engine.active)
        if engine.frozen is not None:
            keys.update(engine.frozen)
        self.mem_keys = list(keys)
        self.mem_pos = 0
        self.disk_cursor: bytes | None = None
        self.disk_done = False

    # -- phase 1 -----------------------------------------------------------------------
    def _prune_memory(self) -> None:
        engine = self.engine
        keep, pins = self.keep, list(engine.pins)
        end = min(self.mem_pos + self.step_keys, len(self.mem_keys))
        horizon = engine.horizon
        for key in self.mem_keys[self.mem_pos:end]:
            frozen_chain = engine.frozen.get(key) if engine.frozen is not None else None
            active_chain = engine.active.get(key)
            chains = (frozen_chain or []) + (active_chain or [])
            if len(chains) <= keep:
                continue
            ts_desc = [ts for ts, _ in reversed(chains)]
            kept = keep_set(ts_desc, keep, pins)
            if frozen_chain:
                # the frozen chain's newest version becomes the key's newest disk row,
                # which is never dropped (see _prune_disk)
                kept.add(frozen_chain[-1][0])
            if len(kept) == len(ts_desc):
                continue
            horizon = max(horizon, horizon_after(ts_desc, kept))
            if frozen_chain:
                survivors = [v for v in frozen_chain if v[0] in kept]
                engine.frozen_versions -= len(frozen_chain) - len(survivors)
                self.removed += len(frozen_chain) - len(survivors)
                engine.frozen[key] = survivors
            if active_chain:
                survivors = [v for v in active_chain if v[0] in kept]
                engine.active_versions -= len(active_chain) - len(survivors)
                self.removed += len(active_chain) - len(survivors)
                engine.active[key] = survivors
        self.mem_pos = end
        if horizon > engine.horizon:
            engine.horizon = horizon
            # Memory-only drops come back from the log after a crash, so the horizon may
            # ride along with the next group commit.
            engine.log.stage_meta(cl.HORIZON, cl.pack_int(horizon))

    # -- phase 2 -----------------------------------------------------------------------
    def _disk_groups(self):
        """(prefix, user key, [(vkey, ts, is a tombstone), ...] newest first) per key,
        from the cursor."""
        storage = self.engine.storage
        start = None if self.disk_cursor is None else self.disk_cursor + _AFTER_ALL_VERSIONS
        prefix = None
        group = []
        user_key = None
        for vkey, value in storage.iterate("data", start=start):
            p = vkey[:-8]
            if p != prefix:
                if group:
                    yield prefix, user_key, group
                prefix, group = p, []
                user_key = split_version_key(vkey)[0]
            group.append((vkey, split_version_key(vkey)[1], value == TOMBSTONE))
        if group:
            yield prefix, user_key, group

    def _prune_disk(self) -> None:
        engine = self.engine
        keep, pins = self.keep, list(engine.pins)
        horizon = engine.horizon
        batch = engine.storage.batch()
        deleted = 0
        seen = 0
        for prefix, key, group in self._disk_groups():
            seen += 1
            self.disk_cursor = prefix
            mem = set()
            for memtable in (engine.frozen, engine.active):
                chain = memtable.get(key) if memtable is not None else None
                if chain:
                    mem.update(ts for ts, _ in chain)
            ts_all = sorted(mem.union(ts for _, ts, _ in group), reverse=True)
            kept = keep_set(ts_all, keep, pins) if len(ts_all) > keep else set(ts_all)
            # Never drop a key's newest live disk row: after a crash the log replays the
            # resident versions on top of it, and their live/deleted accounting
            # (live_keys) needs the version just below them (a tombstone there counts
            # the same as no row, so the oldest-tombstone rule below may drop it).
            kept.add(group[0][1])
            dropped = [vkey for vkey, ts, _ in group if ts not in kept]
            if dropped:
                horizon = max(horizon, horizon_after(ts_all, kept))
            # Memory versions are newer than disk rows, so the oldest survivors are disk
            # rows (newest first in `group`): drop them while they are tombstones. The
            # horizon stays: a read below a dropped tombstone answered "absent" before
            # and still does.
            for vkey, ts, is_tombstone in reversed(group):
                if ts not in kept:
                    continue
                if not is_tombstone:
                    break
                dropped.append(vkey)
                if ts == group[0][1]:
                    engine.cache.update_if_present(key, ABSENT)
            for vkey in dropped:
                batch.delete("data", vkey)
            deleted += len(dropped)
            if seen >= self.step_keys:
                break
        else:
            self.disk_done = True
        if deleted:
            # The horizon may name a version committed but still staged: make the log
            # durable first, so a recovered horizon never exceeds the recovered max_ts.
            engine.log.sync()
            if horizon > engine.horizon:
                engine.horizon = horizon
            batch.put("meta", cl.HORIZON, cl.pack_int(engine.horizon))
            engine.storage.write(batch, wal=True, sync=False)
            self.removed += deleted

    def step(self) -> bool:
        """Process one chunk; True when the whole prune is done."""
        if self.mem_pos < len(self.mem_keys):
            self._prune_memory()
            return False
        if not self.disk_done:
            if self.engine.flush_job is not None:
                # Rows of an unfinished flush are not durable yet (WAL off): let it finish
                # before deciding on disk rows.
                self.engine.flush_step()
                return False
            self._prune_disk()
            if not self.disk_done:
                return False
        duration = time.monotonic() - self.started
        stats = self.engine.prune_stats
        stats["prune_count"] += 1
        stats["versions_removed"] += self.removed
        stats["last_duration_secs"] = duration
        stats["seconds_total"] += duration
        return True
