"""The commit log (`log` column family) and the shard metadata (`meta`).

Group commit: everything a loop pass commits is staged in memory and written by
`CommitLog.sync()` as ONE WAL-on WriteBatch: a single log row

    be64(seq) -> msgpack([record, ...])

plus the meta rows staged in the same pass (block height, prune horizon). A record is

    [ts, [[key, value | None], ...]]                      a commit (one per txn)
    ["p", txn, ts, read_keys, writes, participants]       2PC: prepared here
    ["c", txn, commit_ts]                                 2PC: committed (its writes are
                                                          the commit record before it)
    ["a", txn]                                            2PC: aborted
    ["f", [txn, ...]]                                     2PC: outcomes forgotten
    ["l", live_keys]                                      the shard's live-key count after
                                                          the row (last record of a row)

So a transaction is in the log whole or not at all, and acknowledged == in the WAL.
The live-key count is logged rather than worked out again at replay: replay would need
each key's version just below its replayed ones, and a prune after a crash in the middle of
a flush can delete that row (the newest disk row may then be one of the unfinished
flush's, above the replayed versions).
The 2PC records ride in the same row as the commits: as meta rows of their own they
cost four RocksDB ops per participant per cross-shard txn (put, delete, put, delete),
which measured a third of a shard's CPU on the 2-shard transfer benchmark.

Flush records `flushed_seq` in meta, with a snapshot of the prepared txns and the
outcomes (`prepared/<txn>`, `outcome/<txn>` rows) taken after the log rows it covers.
Recovery loads that snapshot, then replays log rows with seq > flushed_seq. Replay is
idempotent: applying a record twice yields the same versions, and the 2PC records of a
txn replayed over a snapshot that already holds their effect end in the same state.
"""
from __future__ import annotations

import msgpack

from .damage import ADVICE, DamagedDatabase
from .keycodec import be64, from_be64

# meta keys
SHARD_ID = b"shard_id"
SHARD_COUNT = b"shard_count"
FLUSHED_SEQ = b"flushed_seq"
BLOCK = b"block_height"
HORIZON = b"horizon"
LIVE_KEYS = b"live_keys"
MAX_TS = b"max_ts"
LAST_FLUSH = b"last_flush"          # msgpack {"ts", "block", "at"}
PREPARED_PREFIX = b"prepared/"      # flush-time snapshot of the prepared txns
OUTCOME_PREFIX = b"outcome/"        # ...and of the outcomes not yet forgotten

# tags of the 2PC log records (a commit record starts with its int ts instead)
PREPARED = "p"
COMMITTED = "c"
ABORTED = "a"
FORGOTTEN = "f"
LIVE_KEYS_AFTER = "l"   # not a 2PC record: the live-key count after a log row

_packb = msgpack.packb


# `FMT % txn_id` builds the meta key with no call (the 2PC hot path stages two per txn step)
PREPARED_FMT = PREPARED_PREFIX + b"%d"
OUTCOME_FMT = OUTCOME_PREFIX + b"%d"


def txn_of(meta_key: bytes, prefix: bytes) -> int:
    return int(meta_key[len(prefix):])


def pack_int(n: int) -> bytes:
    return _packb(n)


def unpack(raw: bytes | None, default=None):
    return default if raw is None else msgpack.unpackb(raw)


def meta_value(storage, key: bytes, default, check, path: str):
    """A meta row, decoded and checked (check(value) -> bool), or `default` when absent.
    A row that does not decode or is not what it should be is damage, refused with its
    name: recovery used to fail with a bare msgpack "FormatError", or start with a block
    height of "abc" and answer every later block `bad_request`."""
    raw = storage.get("meta", key)
    if raw is None:
        return default
    try:
        value = msgpack.unpackb(raw)
    except Exception as exc:
        value = exc
    if isinstance(value, Exception) or not check(value):
        raise DamagedDatabase(f"{path}: meta row {key.decode(errors='replace')!r} is damaged "
                              f"(holds {raw[:40]!r}); {ADVICE}")
    return value


def is_count(value) -> bool:
    return type(value) is int and value >= 0


class CommitLog:
    """Stages txn records and meta rows; writes them in one batch per sync()."""

    def __init__(self, storage, last_seq: int, fsync: bool):
        self.storage = storage
        self.last_seq = last_seq          # seq of the newest log row written
        self.fsync = fsync
        self.records: list = []           # log records (see above) since the last sync
        # () -> the record that closes every log row (the engine's live-key count), or None
        self.closing_record = None
        self.meta: list = []              # [(key, value | None), ...] since the last sync
        self.syncs = 0
        # The StorageWriteError of a failed sync: what it held is lost (the worker answers
        # it `unavailable`), and RocksDB refuses writes until reopened, so every later
        # sync raises it again instead of writing, or succeeding with nothing staged.
        self.failed: Exception | None = None
        # A Packer of our own: msgpack.packb builds a new Packer per call (~0.4 us each,
        # measured); a flush packs its 2PC snapshot with this one too. One per log, so
        # engines used from different threads never share one.
        self.pack = msgpack.Packer().pack

    def stage_meta(self, key: bytes, value: bytes | None) -> None:
        self.meta.append((key, value))

    @property
    def dirty(self) -> bool:
        return bool(self.records or self.meta)

    def sync(self) -> None:
        """Write everything staged as one WAL-on batch (fsynced in "fsync" mode)."""
        if self.failed is not None:
            raise self.failed
        if not (self.records or self.meta):
            return
        batch = self.storage.batch()
        put = batch.put
        if self.records:
            if self.closing_record is not None:
                self.records.append(self.closing_record())
            self.last_seq += 1
            put("log", be64(self.last_seq), self.pack(self.records))
            self.records = []
        delete = batch.delete
        for key, value in self.meta:
            if value is None:
                delete("meta", key)
            else:
                put("meta", key, value)
        self.meta = []
        try:
            self.storage.write(batch, wal=True, sync=self.fsync)
        except Exception as exc:
            self.failed = exc
            raise
        self.syncs += 1

    def replay(self, after_seq: int):
        """Yield (seq, [record, ...]) for every log row with seq > after_seq."""
        for key, raw in self.storage.iterate("log", start=be64(after_seq + 1)):
            seq = from_be64(key)
            try:
                records = msgpack.unpackb(raw)
            except Exception as exc:
                records = exc
            if type(records) is not list:
                raise DamagedDatabase(f"{self.storage.path}: commit-log row {seq} is damaged "
                                      f"(holds {raw[:40]!r}); {ADVICE}")
            yield seq, records

    def truncate(self, upto_seq: int) -> None:
        """Delete log rows with seq <= upto_seq (they are flushed)."""
        batch = self.storage.batch()
        batch.delete_range("log", be64(0), be64(upto_seq + 1))
        self.storage.write(batch, wal=True, sync=False)

    def newest_seq(self) -> int:
        key = self.storage.last_key("log")
        return 0 if key is None else from_be64(key)
