"""ShardEngine: durable MVCC for one shard, usable in-process with no sockets.

Composition: `storage` (RocksDB column families data/log/meta), `commitlog` (group commit
and replay), `mvcc` (active + frozen memtables, row cache), `flush` / `prune` (incremental
jobs), `checkpoint`. See DESIGN.md "Shard engine API" for the contract.

Memory is updated at call time; records are staged and written by `sync()` in one WAL-on
batch. The worker replies only after `sync()`, so nothing is acknowledged before durable.
"""
from __future__ import annotations

import bisect
import math
import os
import time

import msgpack

from . import commitlog as cl
from .commitlog import CommitLog
from .config import EngineConfig
from .damage import ADVICE, DamagedDatabase
from .errors import BadRequest, Blocked, Conflict, StorageMismatch, TooOld
from .keycodec import MAX_TS, TOMBSTONE, TS_BYTES, dec, enc, split_version_key, untag, version_key, version_suffix
from .mvcc import ABSENT, RowCache, newest_at
from .storage import StorageWriteError, open_db

_packb = msgpack.packb
_NO_LOCK = (None,)


def _check_writes(writes) -> None:
    for item in writes:
        if len(item) != 2:
            raise BadRequest("a write must be [key, value | nil]")
        key, value = item
        if type(key) is not bytes or not key:
            raise BadRequest(f"write key must be non-empty bytes, got {type(key).__name__}")
        if value is not None and type(value) is not bytes:
            raise BadRequest(f"write value must be bytes or nil, got {type(value).__name__}")


def _check_reads(reads) -> None:
    for item in reads:
        if len(item) != 2:
            raise BadRequest("a read must be [key, version]")
        key, version = item
        if type(key) is not bytes or not key:
            raise BadRequest(f"read key must be non-empty bytes, got {type(key).__name__}")
        if type(version) is not int or version < 0:
            raise BadRequest("read version must be an int >= 0")


class ShardEngine:
    """One shard's data. Not thread-safe: one loop owns it (the worker, or a test)."""

    def __init__(self, storage, path: str, shard_id: int, shard_count: int, config: EngineConfig):
        self.storage = storage
        self.path = path
        self.shard_id = shard_id
        self.shard_count = shard_count
        self.config = config
        self.active: dict = {}            # {key: [(ts, value|None), ...]} unflushed versions
        self.frozen: dict | None = None   # the memtable a flush is writing out
        self.active_versions = 0
        self.frozen_versions = 0
        self.released: list = []          # flushed memtables still being freed (release_step)
        self.cache = RowCache(config.max_cached_keys)
        self.max_ts = 0
        self.horizon = 0
        self.block_height = 0
        self.live_keys = 0
        self.locks: dict = {}             # key -> (txn_id, prepare_ts, is_write)
        self.prepared_txns: dict = {}     # txn_id -> {"ts","reads","writes","participants"}
        self.outcomes: dict = {}          # txn_id -> commit_ts (until forget)
        self.pins: dict = {}              # snapshot ts -> pin count (deferred reads)
        self.counters = {"committed": 0, "conflict": 0, "prepared": 0,
                         "commit_prepared": 0, "abort_prepared": 0}
        self._mem_sorted: list | None = None      # sorted resident keys, for scans
        self.log: CommitLog = None        # set by open()
        self.flush_job = None
        self.prune_job = None
        self.flush_stats = {"flush_count": 0, "keys_flushed": 0, "bytes_flushed": 0,
                            "last_flush_ts": 0, "last_flush_block": 0,
                            "last_flush_at": 0.0, "last_duration_secs": 0.0, "seconds_total": 0.0}
        self.prune_stats = {"prune_count": 0, "versions_removed": 0,
                            "last_duration_secs": 0.0, "seconds_total": 0.0}
        self.last_flush_monotonic = time.monotonic()
        self.last_flush_block_height = 0
        self.replayed_records = 0
        self.read_only = False            # opened read-only (open(read_only=True)): no write
        self._writer = None

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, path: str, shard_id: int, shard_count: int,
             config: EngineConfig | None = None, read_only: bool = False) -> "ShardEngine":
        """Open or create the shard at `path`; recover from its log. Raises StorageMismatch
        for a directory that belongs to another shard id / shard count.

        read_only: open an existing shard without writing anything (storage.open_db), for
        a full disk: reads work, and every write is refused (sync raises)."""
        config = config or EngineConfig()
        if not read_only:
            os.makedirs(path, mode=0o700, exist_ok=True)
        storage = open_db(path, config.rocksdb, create=not read_only, read_only=read_only)
        try:
            engine = cls(storage, path, shard_id, shard_count, config)
            engine.read_only = read_only
            engine._check_identity()
            engine._recover()
            if config.flush_on_start and engine.replayed_records and not read_only:
                engine.flush()
        except BaseException:
            try:
                storage.close()
            except Exception:      # closing after a failed write fails too: keep the first error
                pass
            raise
        return engine

    def _check_identity(self) -> None:
        storage = self.storage
        stored_id = cl.meta_value(storage, cl.SHARD_ID, None, cl.is_count, self.path)
        stored_count = cl.meta_value(storage, cl.SHARD_COUNT, None, cl.is_count, self.path)
        if stored_id is None:
            if storage.last_key("data") is not None or storage.last_key("log") is not None:
                raise StorageMismatch(f"{self.path}: has data but no shard identity; not a shardkv shard directory")
            if self.read_only:
                raise StorageMismatch(f"{self.path}: a new shard cannot be set up read-only")
            batch = storage.batch()
            batch.put("meta", cl.SHARD_ID, cl.pack_int(self.shard_id))
            batch.put("meta", cl.SHARD_COUNT, cl.pack_int(self.shard_count))
            storage.write(batch, wal=True, sync=True)
            return
        if stored_id != self.shard_id or stored_count != self.shard_count:
            raise StorageMismatch(
                f"{self.path} holds shard {stored_id} of {stored_count}, "
                f"but was opened as shard {self.shard_id} of {self.shard_count}")

    def _recover(self) -> None:
        """Read meta, restore prepared txns and outcomes, replay the log after flushed_seq.
        Nothing from `data` is loaded: restart time does not depend on keys on disk."""
        def meta(key, default=0, check=cl.is_count):
            return cl.meta_value(self.storage, key, default, check, self.path)
        flushed_seq = meta(cl.FLUSHED_SEQ)
        self.block_height = meta(cl.BLOCK)
        self.horizon = meta(cl.HORIZON)
        self.live_keys = meta(cl.LIVE_KEYS)
        self.max_ts = meta(cl.MAX_TS)
        last = meta(cl.LAST_FLUSH, None, lambda v: isinstance(v, dict) and all(
            type(v.get(f)) in (int, float) for f in ("ts", "block", "at")))
        if last:
            self.flush_stats["last_flush_ts"] = last["ts"]
            self.flush_stats["last_flush_block"] = last["block"]
            self.flush_stats["last_flush_at"] = last["at"]
            self.last_flush_block_height = last["block"]
        self.log = CommitLog(self.storage, max(flushed_seq, 0), self.config.fsync)
        self.log.last_seq = max(flushed_seq, self.log.newest_seq())
        self.log.closing_record = lambda: (cl.LIVE_KEYS_AFTER, self.live_keys)
        where = None
        try:
            for key, raw in self.storage.iterate("meta", prefix=cl.PREPARED_PREFIX):
                where = f"meta row {key!r}"
                ts, reads, writes, participants = msgpack.unpackb(raw)
                self._lock_prepared(cl.txn_of(key, cl.PREPARED_PREFIX), ts, reads, writes, participants)
                self.max_ts = max(self.max_ts, ts)
            for key, raw in self.storage.iterate("meta", prefix=cl.OUTCOME_PREFIX):
                where = f"meta row {key!r}"
                commit_ts = msgpack.unpackb(raw)
                if not cl.is_count(commit_ts):
                    raise ValueError(f"commit ts {commit_ts!r}")
                self.outcomes[cl.txn_of(key, cl.OUTCOME_PREFIX)] = commit_ts
            for seq, records in self.log.replay(flushed_seq):
                where = f"commit-log row {seq}"
                for record in records:
                    if type(record[0]) is int:
                        ts, writes = record
                        self._apply(ts, writes)
                        if ts > self.max_ts:
                            self.max_ts = ts
                        self.replayed_records += 1
                    else:
                        self._replay_2pc(record)
        except (DamagedDatabase, StorageMismatch):
            raise
        except Exception as exc:      # a row that decodes but is not what it should be
            raise DamagedDatabase(f"{self.path}: {where} is damaged ({type(exc).__name__}: {exc}); "
                                  f"{ADVICE}") from exc

    def _replay_2pc(self, record) -> None:
        """Apply one 2PC log record (or the live-key count closing a row) at recovery.
        The meta snapshot loaded before the replay may be newer than the record (a flush
        snapshots after its last log row), so each kind is idempotent and a txn's records
        end in the state they made."""
        tag = record[0]
        if tag == cl.PREPARED:
            _, txn_id, ts, reads, writes, participants = record
            if txn_id not in self.outcomes:
                # Re-locking a txn the snapshot holds restores its locks in log order
                # (a replayed txn that touched the same keys and then ended unlocked them).
                self._lock_prepared(txn_id, ts, reads, writes, participants)
                if ts > self.max_ts:
                    self.max_ts = ts
        elif tag == cl.COMMITTED:
            _, txn_id, commit_ts = record
            self._unlock(txn_id)
            self.outcomes[txn_id] = commit_ts
            if commit_ts > self.max_ts:
                self.max_ts = commit_ts
        elif tag == cl.ABORTED:
            self._unlock(record[1])
        elif tag == cl.FORGOTTEN:
            pop = self.outcomes.pop
            for txn_id in record[1]:
                pop(txn_id, None)
        elif tag == cl.LIVE_KEYS_AFTER:
            # The count the row's records made when they were written: the deltas replay
            # just worked out can be off where a prune deleted the row below a replayed
            # version (commitlog.py). A row written before this record existed keeps them.
            self.live_keys = record[1]
        else:
            raise StorageMismatch(f"{self.path}: commit-log record of unknown kind {tag!r} "
                                  "(written by a newer shardkv?)")

    def close(self) -> None:
        """Sync staged records and close the database (no implicit flush: the log covers
        everything unflushed)."""
        if self.storage is None:
            return
        if not self.read_only:
            self.log.sync()
        if self._writer is not None and hasattr(self._writer, "close"):
            self._writer.close()
        self.storage.close()
        self.storage = None

    def sync(self) -> None:
        """Write everything staged since the last sync in one WAL-on batch."""
        if self.read_only and self.log.dirty:
            raise StorageWriteError(f"{self.path}: opened read-only, nothing can be written")
        self.log.sync()

    # ------------------------------------------------------------------ lookups
    def _disk_version(self, key: bytes, at: int):
        """Newest on-disk (ts, value) of key at or below `at`, through the row cache."""
        cached = self.cache.get(key)
        if cached is not None and cached[0] <= at:
            return cached
        prefix = enc(key)
        if cached is None:
            found = self.storage.seek("data", prefix, prefix)
            newest = ABSENT if found is None else (split_version_key(found[0])[1], untag(found[1]))
            self.cache.put(key, newest)
            if newest[0] <= at:
                return newest
        found = self.storage.seek("data", version_key(key, at), prefix)
        if found is None:
            return ABSENT
        return split_version_key(found[0])[1], untag(found[1])

    def _resident_at(self, key: bytes, at: int):
        """The newest (ts, value|None) of key at or below `at` in the memtables, else None
        (memory versions are newer than disk rows: one found here is the answer)."""
        chain = self.active.get(key)
        if chain:
            found = newest_at(chain, at)
            if found is not None:
                return found
        if self.frozen is not None:
            chain = self.frozen.get(key)
            if chain:
                return newest_at(chain, at)
        return None

    def _version_at(self, key: bytes, at: int):
        """(ts, value|None) of key as of snapshot `at`; ABSENT when none."""
        return self._resident_at(key, at) or self._disk_version(key, at)

    def _current_version(self, key: bytes) -> int:
        """The key's version for validation: commit_ts of its last write, 0 if deleted/absent."""
        chain = self.active.get(key)
        if chain:
            ts, value = chain[-1]
        else:
            ts, value = self._version_at(key, self.max_ts)
        return 0 if value is None else ts

    # ------------------------------------------------------------------ reads
    def _check_snapshot(self, at: int) -> None:
        if type(at) is not int or at < 0:
            raise BadRequest("at must be an int >= 0")
        if at < self.horizon and at not in self.pins:
            raise TooOld(self.horizon, at)

    def read(self, keys, at: int) -> list:
        """[(value | None, version), ...] as of snapshot `at`."""
        if type(at) is not int or at < self.horizon:     # one test on the hot path
            self._check_snapshot(at)
        if self.locks:
            self._check_not_blocked(keys, at)
        out = []
        append = out.append
        active_get = self.active.get
        version_at = self._version_at
        # Hot path (profiled: ~40% of a transfer's engine time was call overhead here): a
        # key whose newest resident version is at or below `at` answers from its chain's
        # last entry with no call; anything else goes through _version_at.
        for key in keys:
            if type(key) is not bytes or not key:
                raise BadRequest("read keys must be non-empty bytes")
            chain = active_get(key)
            if chain:
                ts, value = chain[-1]
                if ts > at:
                    ts, value = version_at(key, at)
            else:
                ts, value = version_at(key, at)
            append((None, 0) if value is None else (value, ts))
        return out

    def _check_not_blocked(self, keys, at: int) -> None:
        """Raise Blocked if a key is written by a prepared txn whose prepare ts <= at."""
        blocked = []
        for key in keys:
            lock = self.locks.get(key)
            if lock is not None and lock[2] and lock[1] <= at:
                blocked.append(lock[0])
        if blocked:
            raise Blocked(blocked)

    def _sorted_resident_keys(self) -> list:
        if self._mem_sorted is None:
            keys = set(self.active)
            if self.frozen is not None:
                keys.update(self.frozen)
            self._mem_sorted = sorted(keys)
        return self._mem_sorted

    def _disk_live_at(self, start: bytes | None, end: bytes | None, at: int, budget: float):
        """(key, (ts, value)) in key order for each key in [start, end) whose newest row on
        disk at or below snapshot `at` is live (not a tombstone). One pass over the rows,
        with no seek and no decoding per deleted key: the scan used to seek every key's
        version separately, so a range of deleted keys (their rows stay on disk until a
        prune) cost a seek each. After `budget` rows, at the next key, it yields
        (that key, None) and stops: every key below it is answered."""
        start_enc = enc(start) if start else None
        stop_enc = enc(end) if end else None
        floor = version_suffix(at)        # the rows at or below `at` sort at or after it
        answered = last = None
        examined = 0
        for vkey, row in self.storage.iterate("data", start=start_enc, stop=stop_enc):
            prefix = vkey[:-TS_BYTES]
            if prefix != last:
                if examined >= budget:    # only between keys: every slice passes one
                    yield dec(prefix), None
                    return
                last = prefix
            examined += 1
            if prefix == answered or vkey[-TS_BYTES:] < floor:
                continue
            answered = prefix
            if row != TOMBSTONE:
                key, ts = split_version_key(vkey)
                yield key, (ts, untag(row))

    def scan(self, start: bytes | None, end: bytes | None, limit: int, at: int):
        """Live keys in [start, end) as of `at`, bytewise order, at most `limit`;
        returns (items [(key, value, version)], more)."""
        if type(limit) is not int or limit < 1:
            raise BadRequest("limit must be an int >= 1")
        items, more, _ = self.scan_slice(start, end, limit, at)
        return items, more

    def scan_slice(self, start: bytes | None, end: bytes | None, limit: int, at: int,
                   budget: float = math.inf):
        """scan, stopping after about `budget` rows on disk: (items, more, resume), where
        resume is None when the scan is complete, else the key to go on from (every live
        key in [start, resume) is in items). A range of deleted keys not yet pruned is
        rows to walk with nothing to list: the worker scans it a slice per loop pass so
        that it keeps answering (a scan of seconds made the router count it dead).
        limit 0 lists nothing and tells whether a live key follows (a slice that ran out
        of budget right after its limit-th item leaves that to the next one).

        An empty bound is no bound, on every path below: the lock check read b"" as an
        empty range while the memtable and disk iterators read it as unbounded (the
        protocol refuses an empty `end`, but the engine must not depend on that)."""
        self._check_snapshot(at)
        if type(limit) is not int or limit < 0:
            raise BadRequest("limit must be an int >= 0")
        start = start or None
        end = end or None
        if self.locks:
            blocked = [txn for key, (txn, ts, is_write) in self.locks.items()
                       if is_write and ts <= at and (start is None or key >= start)
                       and (end is None or key < end)]
            if blocked:
                raise Blocked(blocked)
        mem = self._sorted_resident_keys()
        i = bisect.bisect_left(mem, start) if start else 0
        j = bisect.bisect_left(mem, end) if end else len(mem)
        mem_iter = iter(mem[i:j])
        disk_iter = self._disk_live_at(start, end, at, budget)
        resident_at = self._resident_at
        items = []
        m = next(mem_iter, None)
        d = next(disk_iter, None)       # (key, its newest disk version at `at`, live)
        while m is not None or d is not None:
            if d is not None and d[1] is None and (m is None or m >= d[0]):
                return items, True, d[0]             # out of budget at d[0]
            if d is None or (m is not None and m < d[0]):
                # no live disk row at or below `at` (the disk pass would have named it)
                key, version, m = m, resident_at(m, at) or ABSENT, next(mem_iter, None)
            elif m is None or d[0] < m:
                (key, version), d = d, next(disk_iter, None)
            else:
                key, version = m, resident_at(m, at) or d[1]
                m, d = next(mem_iter, None), next(disk_iter, None)
            ts, value = version
            if value is not None:
                if len(items) == limit:
                    return items, True, None
                items.append((key, value, ts))
        return items, False, None

    def validate(self, reads) -> None:
        """Raise Conflict listing every read key whose version changed or that a prepared
        txn is about to write."""
        _check_reads(reads)
        bad = self._conflicts(reads, (), None)
        if bad:
            self.counters["conflict"] += 1
            raise Conflict(bad)

    def _conflicts(self, reads, writes, txn_id) -> list:
        bad = []
        locks = self.locks
        if locks:
            for key, _ in reads:
                lock = locks.get(key)
                if lock is not None and lock[2] and lock[0] != txn_id:
                    bad.append(key)
            for key, _ in writes:
                lock = locks.get(key)
                if lock is not None and lock[0] != txn_id:
                    bad.append(key)
        current = self._current_version
        for key, version in reads:
            if current(key) != version:
                bad.append(key)
        return bad

    # ------------------------------------------------------------------ writes
    def _apply(self, ts: int, writes) -> None:
        """Append the versions of one txn to the active memtable; keep live_keys exact."""
        active = self.active
        live_delta = 0
        for key, value in writes:
            chain = active.get(key)
            if chain:
                last_ts, last_value = chain[-1]
                if last_ts == ts:          # the same key twice in one txn: last one wins
                    live_delta += (value is not None) - (last_value is not None)
                    chain[-1] = (ts, value)
                    continue
                chain.append((ts, value))
                live_delta += (value is not None) - (last_value is not None)
            else:
                prev_value = self._below_active(key, ts)[1]
                if chain is None:
                    self._mem_sorted = None
                active[key] = [(ts, value)]
                live_delta += (value is not None) - (prev_value is not None)
            self.active_versions += 1
        self.live_keys += live_delta

    def _below_active(self, key: bytes, ts: int):
        """The key's version just below ts outside the active memtable (frozen, disk)."""
        if self.frozen is not None:
            chain = self.frozen.get(key)
            if chain:
                found = newest_at(chain, ts - 1)
                if found is not None:
                    return found
        return self._disk_version(key, ts - 1)

    def _check_new_ts(self, ts) -> None:
        if type(ts) is not int or ts <= self.max_ts:
            raise BadRequest(f"commit ts {ts!r} must be an int above every ts seen ({self.max_ts})")
        if ts > MAX_TS:      # its version key could not be encoded (keycodec), nor its log record
            raise BadRequest(f"commit ts {ts} is above the largest ts {MAX_TS}")

    def commit(self, ts: int, reads, writes) -> None:
        """One-shot commit of a single-shard txn: validate reads, apply writes at ts.
        Raises Conflict (nothing written). With no writes it only validates."""
        if not writes:
            _check_reads(reads)
            return self.validate(reads)
        if self.locks:
            bad = self._checked_conflicts(ts, reads, writes)
        else:
            bad = self._unlocked_conflicts(ts, reads, writes)
        if bad:
            self.counters["conflict"] += 1
            raise Conflict(bad)
        self._apply(ts, writes)
        self.log.records.append((ts, writes))
        self.max_ts = ts
        self.counters["committed"] += 1

    def _checked_conflicts(self, ts, reads, writes) -> list:
        """Input checks, then conflicts including prepared locks (the general path)."""
        _check_reads(reads)
        _check_writes(writes)
        self._check_new_ts(ts)
        return self._conflicts(reads, writes, None)

    def _unlocked_conflicts(self, ts, reads, writes) -> list | None:
        """The commit hot path when no txn is prepared (nothing is locked): each read is
        type-checked and compared with the key's current version in ONE pass with no call
        per key (the profile showed check, lookup and compare as separate passes costing
        about as much as the commit itself). Raises BadRequest in the same order as
        _checked_conflicts: reads, then writes, then ts. Returns the conflicting keys."""
        active_get = self.active.get
        max_ts = self.max_ts
        bad = None
        try:
            for key, version in reads:
                if type(key) is not bytes or not key or type(version) is not int or version < 0:
                    _check_reads(reads)                 # raises the precise BadRequest
                chain = active_get(key)
                if chain:
                    current, value = chain[-1]
                else:
                    current, value = self._version_at(key, max_ts)
                if (0 if value is None else current) != version:
                    if bad is None:
                        bad = []
                    bad.append(key)
            for key, value in writes:
                if type(key) is not bytes or not key or (value is not None and type(value) is not bytes):
                    _check_writes(writes)
        except (TypeError, ValueError):                 # an item that is not a pair
            _check_reads(reads)
            _check_writes(writes)
            raise
        if type(ts) is not int or ts <= max_ts or ts > MAX_TS:
            self._check_new_ts(ts)
        return bad

    # ------------------------------------------------------------------ 2PC
    def _lock_prepared(self, txn_id, ts, read_keys, writes, participants) -> None:
        locks = self.locks
        read_lock = (txn_id, ts, False)     # one tuple shared by every key of the txn
        write_lock = (txn_id, ts, True)
        for key in read_keys:
            locks[key] = read_lock
        for key, _ in writes:
            locks[key] = write_lock
        self.prepared_txns[txn_id] = {"ts": ts, "reads": read_keys, "writes": writes,
                                      "participants": participants}

    def prepare(self, txn_id: int, ts: int, reads, writes, participants) -> None:
        """Validate and lock the txn's keys; stage a durable prepared record. Idempotent
        for a txn already prepared here. Raises Conflict.

        Hot path of every cross-shard txn: input checks, lock checks and the read-version
        check run in ONE pass over reads and one over writes, with no call per key (same
        errors, same order of conflicting keys as _conflicts)."""
        if txn_id in self.prepared_txns:
            return
        if type(txn_id) is not int:
            raise BadRequest("txn id must be an int")
        if txn_id in self.outcomes:
            raise BadRequest(f"txn {txn_id} is already committed here")
        locks_get = self.locks.get
        active_get = self.active.get
        max_ts = self.max_ts
        read_keys = []
        own_writes = []
        read_locked = write_locked = stale = None
        try:
            for key, version in reads:
                if type(key) is not bytes or not key or type(version) is not int or version < 0:
                    _check_reads(reads)                 # raises the precise BadRequest
                read_keys.append(key)
                lock = locks_get(key)
                if lock is not None and lock[2] and lock[0] != txn_id:
                    if read_locked is None:
                        read_locked = []
                    read_locked.append(key)
                chain = active_get(key)
                if chain:
                    current, value = chain[-1]
                else:
                    current, value = self._version_at(key, max_ts)
                if (0 if value is None else current) != version:
                    if stale is None:
                        stale = []
                    stale.append(key)
            for key, value in writes:
                if type(key) is not bytes or not key or (value is not None and type(value) is not bytes):
                    _check_writes(writes)
                own_writes.append((key, value))
                lock = locks_get(key)
                if lock is not None and lock[0] != txn_id:
                    if write_locked is None:
                        write_locked = []
                    write_locked.append(key)
        except (TypeError, ValueError):                 # an item that is not a pair
            _check_reads(reads)
            _check_writes(writes)
            raise
        if type(ts) is not int or ts <= max_ts or ts > MAX_TS:
            self._check_new_ts(ts)
        if read_locked or write_locked or stale:
            self.counters["conflict"] += 1
            raise Conflict((read_locked or []) + (write_locked or []) + (stale or []))
        participants = list(participants)
        self._lock_prepared(txn_id, ts, read_keys, own_writes, participants)
        self.log.records.append((cl.PREPARED, txn_id, ts, read_keys, own_writes, participants))
        self.max_ts = ts
        self.counters["prepared"] += 1

    def _unlock(self, txn_id) -> dict | None:
        txn = self.prepared_txns.pop(txn_id, None)
        if txn is not None:
            locks = self.locks
            for key in txn["reads"]:
                if locks.get(key, _NO_LOCK)[0] == txn_id:
                    del locks[key]
            for key, _ in txn["writes"]:
                if locks.get(key, _NO_LOCK)[0] == txn_id:
                    del locks[key]
        return txn

    def commit_prepared(self, txn_id: int, commit_ts: int) -> None:
        """Apply a prepared txn at commit_ts and keep its outcome until forget. Idempotent.
        The writes were validated and locked by prepare, so they are applied as they are."""
        outcomes = self.outcomes
        if txn_id in outcomes:
            return
        txn = self.prepared_txns.get(txn_id)
        if txn is None:
            raise BadRequest(f"txn {txn_id} is not prepared here")
        if type(commit_ts) is not int or commit_ts < txn["ts"] or commit_ts > MAX_TS:
            raise BadRequest(f"commit ts {commit_ts!r} is below the prepare ts {txn['ts']}")
        self._unlock(txn_id)
        writes = txn["writes"]
        records = self.log.records
        if writes:
            self._apply(commit_ts, writes)
            records.append((commit_ts, writes))
        records.append((cl.COMMITTED, txn_id, commit_ts))
        outcomes[txn_id] = commit_ts
        if commit_ts > self.max_ts:
            self.max_ts = commit_ts
        self.counters["commit_prepared"] += 1

    def abort_prepared(self, txn_id: int) -> None:
        """Drop a prepared txn and its locks. Idempotent (unknown txn: nothing to do)."""
        if self._unlock(txn_id) is not None:
            self.log.records.append((cl.ABORTED, txn_id))
            self.counters["abort_prepared"] += 1

    def prepared(self) -> list:
        return [{"txn": txn_id, "ts": txn["ts"], "participants": list(txn["participants"])}
                for txn_id, txn in sorted(self.prepared_txns.items())]

    def outcome(self, txn_id: int) -> int | None:
        return self.outcomes.get(txn_id)

    def outcome_txns(self) -> list:
        """Ids of every txn this shard keeps an outcome record for."""
        return sorted(self.outcomes)

    def forget(self, txn_ids) -> None:
        pop = self.outcomes.pop
        forgotten = [txn_id for txn_id in txn_ids if pop(txn_id, None) is not None]
        if forgotten:
            self.log.records.append((cl.FORGOTTEN, forgotten))

    def set_block(self, height: int) -> None:
        """Record a block height (durable with the next sync); heights must increase."""
        if type(height) is not int or height <= self.block_height or height > MAX_TS:
            raise BadRequest(f"block height {height!r} must be an int above {self.block_height}"
                             f" and at most {MAX_TS}")
        self.log.stage_meta(cl.BLOCK, cl.pack_int(height))
        self.block_height = height

    # ------------------------------------------------------------------ snapshots
    def pin(self, ts: int) -> None:
        """Keep the versions a read at `ts` needs until unpin (deferred reads)."""
        self.pins[ts] = self.pins.get(ts, 0) + 1

    def unpin(self, ts: int) -> None:
        count = self.pins.get(ts, 0)
        if count <= 1:
            self.pins.pop(ts, None)
        else:
            self.pins[ts] = count - 1

    # ------------------------------------------------------------------ maintenance
    @property
    def writer(self):
        if self._writer is None:
            from .flush import make_writer
            self._writer = make_writer(self.config.batch_writer)
        return self._writer

    def start_flush(self) -> None:
        from .flush import FlushJob
        self.finish_flush()
        self.flush_job = FlushJob(self)

    def finish_flush(self) -> None:
        """Complete a running flush now, waiting for RocksDB (blocking); flush_step()
        then reports it done."""
        if self.flush_job is not None:
            self.flush_job.finish_now()

    def flush_step(self) -> bool:
        """Write one chunk of the running flush; True when it is done (or none runs)."""
        if self.flush_job is None:
            return True
        done = self.flush_job.step()
        if done:
            self.flush_job = None
        return done

    def flush(self) -> dict:
        """Flush everything committed so far; returns {"flush_ts","keys","bytes","duration"}."""
        self.start_flush()
        job = self.flush_job
        self.finish_flush()
        self.flush_job = None
        while not self.release_step():
            pass
        return job.result

    @property
    def flush_waiting(self) -> bool:
        """A flush runs and only waits for RocksDB (its steps have nothing to compute)."""
        return self.flush_job is not None and self.flush_job.writing_sst

    def release_step(self, versions: int = 5_000) -> bool:
        """Free about `versions` versions of flushed memtables; True when none is left.
        Freeing is spread over loop passes like the flush itself: a flushed memtable of a
        million versions is millions of objects to deallocate."""
        released = self.released
        while released and versions > 0:
            memtable = released[-1]
            while memtable and versions > 0:
                versions -= len(memtable.popitem()[1])
            if not memtable:
                released.pop()
        return not released

    def should_flush(self, now: float | None = None) -> bool:
        """Dual trigger (interval_secs or blocks_per_flush) plus memory pressure. Only when
        there is something to flush and no flush runs already."""
        if self.flush_job is not None:
            return False
        if self.active_versions >= self.config.max_resident_versions:
            return True
        if not self.active_versions:
            return False
        now = time.monotonic() if now is None else now
        if now - self.last_flush_monotonic >= self.config.flush_interval_secs:
            return True
        return self.block_height - self.last_flush_block_height >= self.config.blocks_per_flush

    def start_prune(self, keep_versions: int | None = None) -> None:
        from .prune import PruneJob
        if self.prune_job is not None:
            while not self.prune_job.step():
                pass
        keep = self.config.keep_versions if keep_versions is None else keep_versions
        if type(keep) is not int or keep < 1:
            raise BadRequest("keep_versions must be an int >= 1")
        self.prune_job = PruneJob(self, keep)

    def prune_step(self) -> bool:
        if self.prune_job is None:
            return True
        done = self.prune_job.step()
        if done:
            self.prune_job = None
        return done

    def prune(self, keep_versions: int | None = None) -> int:
        """Keep the newest keep_versions versions of each key; returns versions removed."""
        self.start_prune(keep_versions)
        job = self.prune_job
        while not self.prune_step():
            pass
        return job.removed

    def create_checkpoint(self, dest_dir: str, ts: int) -> dict:
        from .checkpoint import create_checkpoint
        return create_checkpoint(self, dest_dir, ts)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        storage = self.storage
        rocks = {
            "live_sst_bytes": storage.property_int("rocksdb.live-sst-files-size"),
            "estimated_keys": storage.property_int("rocksdb.estimate-num-keys"),
            "pending_compaction_bytes": storage.property_int("rocksdb.estimate-pending-compaction-bytes"),
            "memtable_bytes": sum(storage.property_int("rocksdb.cur-size-all-mem-tables", cf)
                                  for cf in ("data", "log", "meta")),
            # one cache for every column family (storage.open_db); it also holds blocks of
            # SST files that compaction has deleted until they are evicted, so it fills to
            # [rocksdb] block_cache_bytes under churn: most of a busy shard's RSS
            "block_cache_bytes": storage.property_int("rocksdb.block-cache-usage"),
        }
        flush = dict(self.flush_stats)
        flush["running"] = self.flush_job is not None
        prune = dict(self.prune_stats)
        prune["running"] = self.prune_job is not None
        return {
            "shard": self.shard_id,
            "keys": self.live_keys,
            "versions": self.active_versions + self.frozen_versions,
            "cached_keys": len(self.cache),
            "horizon": self.horizon,
            "max_ts": self.max_ts,
            "block_height": self.block_height,
            "prepared": len(self.prepared_txns),
            "outcomes": len(self.outcomes),
            "engine_txn": dict(self.counters),
            "flush": flush,
            "prune": prune,
            "batch_writer": {"chunk_size": self.writer.chunk_size},
            "rocksdb": rocks,
        }
