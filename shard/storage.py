"""The storage seam: a small interface the engine uses exclusively, and its RocksDB
implementation.

Column families: `data` (version rows), `log` (commit log), `meta` (shard metadata).
Every RocksDB tuning knob lives in `open_db()`, fed by the `[rocksdb]` config section.
rocksdict is opened in raw mode: keys and values are bytes, never pickled.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterator, Protocol

import rocksdict

from . import damage
from .damage import DamagedDatabase

COLUMN_FAMILIES = ("data", "log", "meta")


class StorageWriteError(Exception):
    """A write to RocksDB failed: the disk is full, or an I/O error. RocksDB then refuses
    every later write to that database until it is closed and opened again, so the
    engine's in-memory state (already ahead of the failed write) can no longer be made
    durable: the shard worker answers what it holds `unavailable` and restarts from disk.
    `no_space`: the cause was ENOSPC/EDQUOT (nothing of the failed write can reach the
    log then: a WAL append that ran out of space leaves a torn record, which recovery
    drops)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.no_space = is_no_space(message)


def is_no_space(message: str) -> bool:
    return "No space left on device" in message or "Disk quota exceeded" in message


def _failed(exc: Exception) -> Exception:
    """rocksdict raises a plain Exception carrying RocksDB's status: an I/O error, or the
    corruption a background job ran into, is a failed write; anything else (an invalid
    argument, a TypeError) is a bug and stays as it is."""
    if type(exc) is Exception and str(exc).startswith(("IO error", "Corruption")):
        return StorageWriteError(str(exc))
    return exc


class _WriteFailures:
    """`with _WRITING:` around a RocksDB call that writes (a batch, a flush, a checkpoint,
    a close) turns the I/O error it raises into StorageWriteError; other errors pass."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, Exception):
            failed = _failed(exc)
            if failed is not exc:
                raise failed from exc
        return False


_WRITING = _WriteFailures()


Row = tuple[str, bytes, "bytes | None"]     # (cf, key, value or None = delete)

ROCKSDB_DEFAULTS = {
    "write_buffer_bytes": 64 * 1024 * 1024,
    "max_write_buffers": 4,
    "block_cache_bytes": 128 * 1024 * 1024,
    "bloom_bits_per_key": 10,
    "compression": "lz4",
    "max_background_jobs": 2,
}
_COMPRESSION = {
    "none": rocksdict.DBCompressionType.none,
    "snappy": rocksdict.DBCompressionType.snappy,
    "lz4": rocksdict.DBCompressionType.lz4,
    "zstd": rocksdict.DBCompressionType.zstd,
}


class Batch(Protocol):
    def put(self, cf: str, key: bytes, value: bytes) -> None: ...
    def delete(self, cf: str, key: bytes) -> None: ...
    def delete_range(self, cf: str, begin: bytes, end: bytes) -> None: ...
    def __len__(self) -> int: ...


class Storage(Protocol):
    """What the engine needs from a key-value store with column families."""

    def get(self, cf: str, key: bytes) -> bytes | None: ...
    def put(self, cf: str, key: bytes, value: bytes, wal: bool = True, sync: bool = False) -> None: ...
    def delete(self, cf: str, key: bytes, wal: bool = True, sync: bool = False) -> None: ...
    def seek(self, cf: str, key: bytes, prefix: bytes) -> tuple[bytes, bytes] | None: ...
    def iterate(self, cf: str, start: bytes | None = None, stop: bytes | None = None,
                prefix: bytes | None = None) -> Iterator[tuple[bytes, bytes]]: ...
    def last_key(self, cf: str) -> bytes | None: ...
    def batch(self) -> Batch: ...
    def write(self, batch: Batch, wal: bool = True, sync: bool = False) -> None: ...
    def write_batch(self, rows: list[Row], wal: bool) -> None: ...
    def write_pairs(self, cf: str, keys: list[bytes], values: list[bytes], wal: bool) -> None: ...
    def flush(self, cfs: tuple[str, ...] = COLUMN_FAMILIES, wait: bool = True) -> None: ...
    def checkpoint(self, dest_dir: str) -> None: ...
    def property_int(self, name: str, cf: str = "data") -> int: ...
    def close(self) -> None: ...


def _check_stopped(it) -> None:
    """An iterator that is no longer valid reached the end, or failed to read (a damaged
    SST block: RocksDB stops there). A damaged block used to read as the end of the
    data: its keys answered as absent, and a txn that read one as version 0 committed."""
    try:
        it.status()
    except Exception as exc:
        raise DamagedDatabase(f"{exc}; {damage.ADVICE}") from exc


class RocksBatch:
    """A rocksdict WriteBatch addressed by column family name."""
    __slots__ = ("wb", "_handles")

    def __init__(self, handles: dict):
        self.wb = rocksdict.WriteBatch(raw_mode=True)
        self._handles = handles

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.wb.put(key, value, self._handles[cf])

    def delete(self, cf: str, key: bytes) -> None:
        self.wb.delete(key, self._handles[cf])

    def delete_range(self, cf: str, begin: bytes, end: bytes) -> None:
        self.wb.delete_range(begin, end, self._handles[cf])

    def __len__(self) -> int:
        return len(self.wb)


def _write_options(wal: bool, sync: bool) -> rocksdict.WriteOptions:
    opts = rocksdict.WriteOptions()
    opts.disable_wal = not wal
    opts.sync = sync and wal
    return opts


class RocksStorage:
    """Storage over one RocksDB database (one per shard directory)."""

    def __init__(self, db: rocksdict.Rdict, path: str):
        self.path = path
        self._db = db
        self.recovery_note = None   # open_db: a torn log tail it recovered past, to log
        self.cfs = {name: db.get_column_family(name) for name in COLUMN_FAMILIES}
        self.handles = {name: db.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        # WriteOptions objects are reused: the commit path writes thousands of batches/s.
        self._wopts = {(w, s): _write_options(w, s) for w in (True, False) for s in (True, False)}

    # -- point operations ---------------------------------------------------------------
    def get(self, cf: str, key: bytes) -> bytes | None:
        return self.cfs[cf].get(key)

    def put(self, cf: str, key: bytes, value: bytes, wal: bool = True, sync: bool = False) -> None:
        with _WRITING:
            self.cfs[cf].put(key, value, self._wopts[wal, sync])

    def delete(self, cf: str, key: bytes, wal: bool = True, sync: bool = False) -> None:
        batch = self.batch()
        batch.delete(cf, key)
        self.write(batch, wal, sync)

    # -- iteration ----------------------------------------------------------------------
    def seek(self, cf: str, key: bytes, prefix: bytes) -> tuple[bytes, bytes] | None:
        """The first row at or after `key` whose key starts with `prefix`, else None."""
        it = self.cfs[cf].iter()
        it.seek(key)
        if it.valid():
            found = it.key()
            if found.startswith(prefix):
                return found, it.value()
            return None
        _check_stopped(it)
        return None

    def iterate(self, cf: str, start: bytes | None = None, stop: bytes | None = None,
                prefix: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Rows in key order from `start` (inclusive) to `stop` (exclusive), optionally
        only those starting with `prefix`."""
        if prefix is not None and (start is None or start < prefix):
            start = prefix
        it = self.cfs[cf].iter()
        if start is None:
            it.seek_to_first()
        else:
            it.seek(start)
        while it.valid():
            key = it.key()
            if stop is not None and key >= stop:
                return
            if prefix is not None and not key.startswith(prefix):
                return
            yield key, it.value()
            it.next()
        _check_stopped(it)

    def last_key(self, cf: str) -> bytes | None:
        it = self.cfs[cf].iter()
        it.seek_to_last()
        if it.valid():
            return it.key()
        _check_stopped(it)
        return None

    # -- batches ------------------------------------------------------------------------
    def batch(self) -> RocksBatch:
        return RocksBatch(self.handles)

    def write(self, batch: RocksBatch, wal: bool = True, sync: bool = False) -> None:
        with _WRITING:
            self._db.write(batch.wb, self._wopts[wal, sync])

    def write_batch(self, rows: list[Row], wal: bool) -> None:
        """Write rows as one atomic batch (the adaptive batch writer's sink)."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        handles = self.handles
        for cf, key, value in rows:
            if value is None:
                wb.delete(key, handles[cf])
            else:
                wb.put(key, value, handles[cf])
        with _WRITING:
            self._db.write(wb, self._wopts[wal, False])

    def write_pairs(self, cf: str, keys: list[bytes], values: list[bytes], wal: bool) -> None:
        """Put keys[i] -> values[i] into one column family as one atomic batch.

        The flush hot path: the puts run as a C-level map over the batch's bound `put`
        (default column family set once), so there is no Python bytecode per row."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        wb.set_default_column_family(self.handles[cf])
        deque(map(wb.put, keys, values), maxlen=0)
        with _WRITING:
            self._db.write(wb, self._wopts[wal, False])

    # -- maintenance --------------------------------------------------------------------
    def flush(self, cfs: tuple[str, ...] = COLUMN_FAMILIES, wait: bool = True) -> None:
        """Write the memtables of these column families to SST files (durable) and wait;
        with wait=False only start it (RocksDB's background threads do the work)."""
        with _WRITING:
            for name in cfs:
                self.cfs[name].flush(wait)

    def checkpoint(self, dest_dir: str) -> None:
        """A consistent copy of the whole database at dest_dir (hard links where possible)."""
        with _WRITING:      # it flushes the memtables first: that can fail as a write
            rocksdict.Checkpoint(self._db).create_checkpoint(dest_dir)

    def property_int(self, name: str, cf: str = "data") -> int:
        value = self.cfs[cf].property_int_value(name)
        return int(value or 0)

    def close(self) -> None:
        if self._db is None:
            return
        # Every column-family handle keeps the database (and its LOCK) alive: drop them all,
        # also when closing fails (after a failed write RocksDB's close reports that error
        # again; the database is released once the last reference is gone).
        db, cfs = self._db, list(self.cfs.values())
        self._db = None
        self.cfs.clear()
        self.handles.clear()
        with _WRITING:
            for cf in cfs:
                cf.close()
            db.close()


def _options(cfg: dict, cache: rocksdict.Cache) -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.set_write_buffer_size(int(cfg["write_buffer_bytes"]))
    opts.set_max_write_buffer_number(int(cfg["max_write_buffers"]))
    compression = cfg["compression"]
    if compression not in _COMPRESSION:
        raise ValueError(f"rocksdb.compression={compression!r}: one of {', '.join(_COMPRESSION)}")
    opts.set_compression_type(_COMPRESSION[compression]())
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(cache)
    if int(cfg["bloom_bits_per_key"]) > 0:
        table.set_bloom_filter(int(cfg["bloom_bits_per_key"]), False)
    opts.set_block_based_table_factory(table)
    return opts


INFO_LOG_FILES_KEPT = 4          # RocksDB's LOG plus the newest LOG.old.* files
INFO_LOG_MAX_BYTES = 16 << 20


def open_db(path: str, rocksdb_cfg: dict | None = None, create: bool = True,
            read_only: bool = False) -> RocksStorage:
    """Open (or create) the shard database at `path`: the ONE place for RocksDB options.

    read_only: open without writing anything (RocksDB replays the WAL into memory only),
    which works on a full disk where a read-write open cannot even write its new
    MANIFEST; every write to it fails. An open that fails for want of space raises
    StorageWriteError (no_space set); any other failure is raised as it is."""
    cfg = dict(ROCKSDB_DEFAULTS)
    cfg.update(rocksdb_cfg or {})
    if not os.path.exists(os.path.join(path, "CURRENT")):
        if not create:
            raise FileNotFoundError(f"{path}: no RocksDB database here")
        damage.check_current(path)
    note = None
    try:
        db = _rdict(path, cfg, create, read_only, "tolerate_corrupted_tail_records")
    except Exception as exc:
        if type(exc) is not Exception:
            raise
        if is_no_space(str(exc)):
            raise StorageWriteError(str(exc)) from exc
        if "No such file or directory" in str(exc):
            raise DamagedDatabase(f"{path}: a file of the database is missing ({exc}); "
                                  f"{damage.ADVICE}") from exc
        if not str(exc).startswith("Corruption"):
            raise
        # Damage in a log: a torn tail (a crash) is recovered, anything before it refused.
        note = damage.tail_or_refuse(path, exc, lambda mode: _latest_seq(path, cfg, mode))
        db = _rdict(path, cfg, create, read_only, "point_in_time")
    storage = RocksStorage(db, path)
    storage.recovery_note = note
    return storage


def _rdict(path: str, cfg: dict, create: bool, read_only: bool, recovery: str) -> rocksdict.Rdict:
    cache = rocksdict.Cache(int(cfg["block_cache_bytes"]))
    db_opts = _options(cfg, cache)
    db_opts.create_if_missing(create)
    db_opts.create_missing_column_families(True)
    db_opts.set_max_background_jobs(int(cfg["max_background_jobs"]))
    # Commit-log records are WAL-protected. A log cut short by a crash opens (its torn
    # record was never acknowledged); other damage is for shard/damage.py to judge.
    db_opts.set_wal_recovery_mode(getattr(rocksdict.DBRecoveryMode, recovery)())
    # RocksDB's info LOG starts a new file at every open and keeps the old ones (1000 by
    # default). A shard that restarts often (the soak SIGKILLs one every 30 s) grew its
    # directory by 4-12 MB a restart, all of it old LOGs: keep a few, each capped.
    db_opts.set_keep_log_file_num(INFO_LOG_FILES_KEPT)
    db_opts.set_max_log_file_size(INFO_LOG_MAX_BYTES)
    column_families = {name: _options(cfg, cache) for name in COLUMN_FAMILIES}
    access = rocksdict.AccessType.read_only() if read_only else rocksdict.AccessType.read_write()
    return rocksdict.Rdict(path, db_opts, column_families=column_families, access_type=access)


def _latest_seq(path: str, cfg: dict, recovery: str) -> int:
    """RocksDB's latest sequence number after a read-only open in this recovery mode."""
    db = _rdict(path, cfg, False, True, recovery)
    try:
        return db.latest_sequence_number()
    finally:
        db.close()
