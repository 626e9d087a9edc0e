"""Incremental flush: frozen memtable -> `data` column family, crash-safe at every point.

Order (DESIGN.md "MVCC and flush"):
1. start: sync staged records, freeze the active memtable (a consistent cut: everything
   in the log up to `freeze_seq`), start a new active memtable;
2. steps: write the frozen versions in chunks through the adaptive batch writer, WAL off
   (a crash loses them, but the log still holds them); half-way through a large flush,
   start a RocksDB flush of the rows written so far without waiting for it (it runs in
   RocksDB's threads while the rest is encoded; rows in SST files before the meta write
   are as harmless as rows in the memtable: a replay rewrites the same rows);
3. finish: a RocksDB flush of `data` to SST files (durable), started without waiting;
   later steps only check its progress (FlushJob.wait_step). Then one WAL-on meta write
   of flushed_seq / block / live_keys / max_ts and the 2PC snapshot, then delete the log
   up to freeze_seq and start a RocksDB flush of `log` and `meta` (so RocksDB can delete
   the WAL files the flush made obsolete), then hand the frozen memtable to
   engine.release_step. A crash
   before the meta write replays the log (idempotent: same rows); after it, the log rows
   <= flushed_seq are skipped whether or not they were deleted.
"""
from __future__ import annotations

import time
from itertools import islice

import msgpack

from . import commitlog as cl
from .keycodec import LIVE_TAG, MAX_TS, TERMINATOR, TOMBSTONE, prefix_end, version_suffix_packer


# A flush of at least this many versions is written to two SST files, the first one
# built in the background while the second half is encoded (see FlushJob.__init__).
SPLIT_MIN_VERSIONS = 20_000


class FixedChunkWriter:
    """Stand-in with the AdaptiveBatchWriter interface (fixed chunk size)."""

    def __init__(self, chunk_size: int = 10000):
        self.chunk_size = chunk_size

    def record(self, ops: int, seconds: float) -> str:
        return "hold"

    def write(self, storage, rows, wal: bool) -> tuple[int, int]:
        ops = nbytes = 0
        rows = iter(rows)
        while True:
            chunk = list(islice(rows, self.chunk_size))
            if not chunk:
                return ops, nbytes
            storage.write_batch(chunk, wal)
            ops += len(chunk)
            nbytes += sum(len(k) + (len(v) if v is not None else 0) for _, k, v in chunk)


def make_writer(batch_writer_cfg: dict):
    """The adaptive batch writer from the [batch_writer] section (env overrides apply)."""
    try:
        from .batch_writer import AdaptiveBatchWriter, AdaptiveConfig
    except ImportError:          # not landed yet: plain chunked WriteBatches
        return FixedChunkWriter(int((batch_writer_cfg or {}).get("min_chunk", 10000)))
    return AdaptiveBatchWriter(AdaptiveConfig.from_dict(batch_writer_cfg or {}))



def python_encode_rows(items, cached=None, max_rows=-1) -> tuple[int, list, list, int]:
    """(keys taken, version keys, value rows, their bytes) for the (key, chain) pairs in `items`;
    keys present in the `cached` dict (the row cache) get their newest version there. With
    max_rows >= 0, stops after the first key that brings the rows to max_rows, leaving
    the rest of the `items` iterator unconsumed (a flush step's budget is in rows).

    The flush hot path, written out by hand (no keycodec calls per row): the profile
    had version_key/tag/generator overhead at ~60% of the flush. It builds exactly
    keycodec.version_key(key, ts) and keycodec.tag(value) (tests/shard/test_flush_encode
    checks that); the memcomparable escape is only needed for keys holding a 0 byte.
    The cache update happens here, before the chunk is written: reads consult the
    frozen memtable before the cache, so the cache may name the newest row early.

    Measured alternatives that were NOT faster (see issue 6): C-level map/itemgetter/
    chain.from_iterable pipelines over the chunk (same time or slower: the cost is
    touching ~5 scattered objects and allocating 2 bytes objects per row, not the
    bytecode); anything building a tuple per row (list(dict.items()), zip(*...)) wakes
    the cyclic GC and doubles the time; a per-ts suffix cache wins only when a txn
    writes many keys and loses ~40% on transfer-like chains (unique ts per version)."""
    cached = cached if cached is not None else {}
    pack_suffix = version_suffix_packer
    vkeys, values = [], []
    add_key, add_value = vkeys.append, values.append
    taken = 0
    for key, chain in items:
        taken += 1
        if key in cached and chain:
            cached[key] = chain[-1]
        # `0 in key` (int membership, a memchr) means the same as `b"\x00" in key` for
        # bytes but is ~6x cheaper: the bytes-needle form was ~40% of the encoder's time.
        prefix = (key.replace(b"\x00", b"\x00\xff") if 0 in key else key) + TERMINATOR
        for ts, value in chain:
            add_key(prefix + pack_suffix(MAX_TS - ts))
            add_value(TOMBSTONE if value is None else LIVE_TAG + value)
        if 0 <= max_rows <= len(vkeys):
            break
    # join+len is a memcpy: ~2x cheaper than sum(map(len, ...)) for short keys
    return taken, vkeys, values, len(b"".join(vkeys)) + sum(map(len, values))


# The flush uses the C encoder when the install built it (pyproject.toml ext-modules,
# optional): the same rows (tests/shard/test_flush_encode.py checks both against
# keycodec) in about a quarter of the time.
try:
    from ._rowcodec import encode_rows as native_encode_rows
except ImportError:          # no C compiler at install time
    native_encode_rows = None
encode_rows = native_encode_rows or python_encode_rows
ENCODER = "native" if native_encode_rows else "python"


def write_2pc_snapshot(batch, prepared_txns: dict, outcomes: dict, pack) -> None:
    """Replace the meta snapshot of prepared txns and outcomes with the given state."""
    for prefix in (cl.PREPARED_PREFIX, cl.OUTCOME_PREFIX):
        batch.delete_range("meta", prefix, prefix_end(prefix))
    for txn_id, txn in prepared_txns.items():
        batch.put("meta", cl.PREPARED_FMT % txn_id,
                  pack((txn["ts"], txn["reads"], txn["writes"], txn["participants"])))
    for txn_id, commit_ts in outcomes.items():
        batch.put("meta", cl.OUTCOME_FMT % txn_id, pack(commit_ts))


class FlushJob:
    def __init__(self, engine):
        engine.log.sync()
        self.engine = engine
        self.started = time.monotonic()
        self.frozen = engine.active
        engine.frozen = self.frozen
        engine.frozen_versions = engine.active_versions
        engine.active = {}
        engine.active_versions = 0
        self.freeze_seq = engine.log.last_seq
        self.flush_ts = engine.max_ts
        self.block = engine.block_height
        self.live_keys = engine.live_keys
        self.keys = len(self.frozen)
        self.ops = 0
        self.bytes = 0
        # Half-way, the rows written so far start going to an SST file in RocksDB's
        # background threads (GIL released) while this thread encodes the rest, so
        # _finish waits only for the second half. A small flush is not split (a second
        # L0 file would cost more than it saves).
        versions = engine.frozen_versions
        self._split_at = versions // 2 if versions >= SPLIT_MIN_VERSIONS else None
        # Chains are replaced, never shrunk in place, by prune, and no key is added to a
        # frozen memtable: iterating it across steps is safe.
        self._items = iter(self.frozen.items())
        self.result = None
        # Set once every row is written and RocksDB was asked to flush them to SST files
        # without waiting: later steps only check whether it is done (see wait_step).
        self.writing_sst = False
        self.done = False

    def step(self) -> bool:
        """Write the versions of the next frozen keys, about `chunk_size` rows, as one
        WAL-off batch. The budget is in rows, not keys: with long version chains (a few
        hot keys written all the time) a budget of keys made one step of a whole flush,
        and the shard answered nothing for about a second."""
        if self.done:
            return True
        if self.writing_sst:
            return self.wait_step()
        engine = self.engine
        writer = engine.writer
        size = writer.chunk_size
        started = time.perf_counter()
        taken, vkeys, values, nbytes = encode_rows(self._items, engine.cache.rows, size)
        if vkeys:
            engine.storage.write_pairs("data", vkeys, values, wal=False)
            self.ops += len(vkeys)
            self.bytes += nbytes
            if self._split_at is not None and self.ops >= self._split_at:
                self._split_at = None
                engine.storage.flush(("data",), wait=False)
        if len(vkeys) >= size:
            # Only full chunks vote: a short tail says little about throughput at `size`.
            # (A full chunk may have taken the last key: the next step then finishes.)
            writer.record(len(vkeys), time.perf_counter() - started)
            return False
        # Every row is written. Waiting here for RocksDB to put them in SST files took
        # ~0.1 s for a million rows, with the shard answering nothing: start it instead,
        # and finish in a later step once it is done.
        self._items = None
        engine.storage.flush(("data",), wait=False)
        self.writing_sst = True
        return False

    def wait_step(self) -> bool:
        """Finish if RocksDB has written the flushed rows to SST files, else False."""
        storage = self.engine.storage
        if (storage.property_int("rocksdb.num-immutable-mem-table", "data")
                or storage.property_int("rocksdb.mem-table-flush-pending", "data")):
            return False
        self._finish()
        return True

    def finish_now(self) -> None:
        """Write the rest and wait for RocksDB (the in-process blocking flush)."""
        if self.done:
            return
        while not self.writing_sst:
            self.step()
        self.engine.storage.flush(("data",))
        self._finish()

    def _finish(self) -> None:
        engine = self.engine
        storage = engine.storage
        self.done = True
        now = time.time()
        # The log rows up to freeze_seq go, and with them the 2PC records of the txns
        # still prepared or not yet forgotten: keep those as a snapshot in meta. Taken
        # after a sync, so it holds only durable records; it may be newer than
        # freeze_seq, which replay tolerates (commitlog.py).
        engine.log.sync()
        batch = storage.batch()
        write_2pc_snapshot(batch, engine.prepared_txns, engine.outcomes, engine.log.pack)
        batch.put("meta", cl.FLUSHED_SEQ, cl.pack_int(self.freeze_seq))
        batch.put("meta", cl.BLOCK, cl.pack_int(engine.block_height))
        batch.put("meta", cl.LIVE_KEYS, cl.pack_int(self.live_keys))
        batch.put("meta", cl.MAX_TS, cl.pack_int(self.flush_ts))
        batch.put("meta", cl.LAST_FLUSH, msgpack.packb(
            {"ts": self.flush_ts, "block": self.block, "at": now}))
        storage.write(batch, wal=True, sync=engine.config.fsync)
        if self.freeze_seq:
            engine.log.truncate(self.freeze_seq)
        # RocksDB deletes a WAL file only once every column family with rows in it has
        # flushed them to SST files. `data` just did; `log` and `meta` get a few rows per
        # pass and would not fill a memtable for a long time, so every WAL file since
        # their last flush stayed: without this, a shard's WAL grew by everything it
        # committed, flush after flush (48 MB after 8 flushes of 6 MB, with 1.5 MB of live
        # data), until RocksDB's max_total_wal_size (gigabytes by default) forced it.
        storage.flush(("log", "meta"), wait=False)
        # The flushed memtable is freed a slice at a time (engine.release_step): dropping
        # a million versions at once took ~0.2 s of the loop.
        engine.released.append(self.frozen)
        self.frozen = None
        engine.frozen = None
        engine.frozen_versions = 0
        engine._mem_sorted = None
        duration = time.monotonic() - self.started
        stats = engine.flush_stats
        stats["flush_count"] += 1
        stats["keys_flushed"] += self.keys
        stats["bytes_flushed"] += self.bytes
        stats["last_flush_ts"] = self.flush_ts
        stats["last_flush_block"] = self.block
        stats["last_flush_at"] = now
        stats["last_duration_secs"] = duration
        stats["seconds_total"] += duration
        engine.last_flush_monotonic = time.monotonic()
        engine.last_flush_block_height = self.block
        self.result = {"flush_ts": self.flush_ts, "keys": self.keys, "bytes": self.bytes,
                       "duration": duration}
