"""Flush (incremental, with commits in between) and prune (memory + disk, pins, horizon)."""
import sys
import time

import pytest

from shard import commitlog as cl
from shard.config import EngineConfig
from shard.errors import TooOld
from shard.keycodec import enc, split_version_key, untag, version_key


def test_incremental_flush_with_commits_between_steps(open_engine):
    e = open_engine()
    e.commit(1, [], [(b"k%02d" % i, b"v1") for i in range(20)])
    e.set_block(3)
    e.start_flush()
    assert not e.flush_step()                      # chunks of 2 rows: many steps
    e.commit(2, [(b"k00", 1)], [(b"k00", None), (b"new", b"v2")])
    while not e.flush_step():
        pass
    s = e.stats()
    assert s["flush"]["flush_count"] == 1 and s["flush"]["keys_flushed"] == 20
    assert s["flush"]["last_flush_ts"] == 1 and s["flush"]["last_flush_block"] == 3
    assert s["versions"] == 2 and s["keys"] == 20
    assert e.read([b"k00", b"k01", b"new"], 2) == [(None, 0), (b"v1", 1), (b"v2", 2)]
    assert e.read([b"k00"], 1) == [(b"v1", 1)]
    e.close()
    e = open_engine()
    assert e.replayed_records == 1 and e.read([b"k00", b"new"], 2) == [(None, 0), (b"v2", 2)]


def test_stats_show_the_block_cache_filling_as_reads_reach_the_sst_files(open_engine):
    """Reads of flushed rows go through RocksDB's block cache; the shard reports how much
    it holds (shardkv_rocksdb_block_cache_bytes), most of a busy shard's RSS."""
    e = open_engine()
    e.commit(1, [], [(b"k%04d" % i, b"v" * 100) for i in range(2000)])
    e.flush()
    e.close()
    e = open_engine()                               # nothing resident: reads go to disk
    before = e.stats()["rocksdb"]["block_cache_bytes"]
    assert e.read([b"k%04d" % i for i in range(0, 2000, 7)], 1)[0] == (b"v" * 100, 1)
    assert e.stats()["rocksdb"]["block_cache_bytes"] > before + 10_000


def test_flush_steps_are_bounded_in_rows_with_long_version_chains(open_engine):
    """The step budget counts rows: 10 keys of 20 versions each with an 8-row budget
    take a key (20 rows) per step, where a budget of 8 keys took 160 rows at once."""
    e = open_engine()
    for ts in range(1, 21):
        e.commit(ts, [], [(b"k%d" % i, b"v%d" % ts) for i in range(10)])
    e.start_flush()
    job = e.flush_job
    written = []
    while not e.flush_step():
        written.append(job.ops - sum(written))
    assert written[:10] == [20] * 10 and not any(written[10:])
    assert e.read([b"k3"], 20) == [(b"v20", 20)]


def test_flush_waits_for_rocksdb_in_steps_and_records_flushed_seq_last(open_engine):
    """Once every row is written the job asks RocksDB for the SST file without waiting;
    flushed_seq, the 2PC snapshot and the log truncation follow in a later step."""
    e = open_engine()
    e.commit(1, [], [(b"k%02d" % i, b"v") for i in range(6)])
    e.sync()
    e.start_flush()
    while not e.flush_waiting:
        assert not e.flush_step()
    assert e.storage.get("meta", cl.FLUSHED_SEQ) is None        # not recorded yet
    assert list(e.storage.iterate("log"))                        # the log still covers it
    deadline = time.monotonic() + 30
    while not e.flush_step():                                    # RocksDB's thread finishes
        assert time.monotonic() < deadline, "RocksDB never finished the flush"
        time.sleep(0.001)
    assert cl.unpack(e.storage.get("meta", cl.FLUSHED_SEQ)) == 1
    assert list(e.storage.iterate("log")) == [] and not e.flush_waiting
    assert e.read([b"k05"], 1) == [(b"v", 1)]


def test_a_flushed_memtable_is_freed_a_slice_at_a_time(open_engine):
    e = open_engine()
    for ts in range(1, 6):
        e.commit(ts, [], [(b"k%03d" % i, b"v%d" % ts) for i in range(100)])
    e.start_flush()
    e.flush_job.finish_now()                     # blocking, as at shutdown
    assert e.flush_step() and e.flush_job is None and e.stats()["flush"]["flush_count"] == 1
    assert len(e.released) == 1 and len(e.released[0]) == 100
    steps = 1
    while not e.release_step(versions=50):        # 10 keys (50 versions) per slice
        steps += 1
        assert e.read([b"k000", b"k099"], 5) == [(b"v5", 5), (b"v5", 5)]
    assert steps == 10 and e.released == []


def test_releasing_a_flushed_memtable_frees_its_values_and_no_live_version(open_engine):
    """Freeing a flushed memtable a slice at a time gives the values' memory back, and
    nothing a reader can reach (the new active memtable, the row cache) loses a version."""
    e = open_engine()
    values = [b"value-%d-" % i + bytes(50) for i in range(200)]   # unique objects
    for ts in (1, 2):
        e.commit(ts, [], [(b"k%03d" % i, values[i + (ts - 1) * 100]) for i in range(100)])
    baseline = sys.getrefcount(values[0])
    assert baseline > 2                        # the memtable holds it: refcount is a witness
    e.start_flush()
    e.commit(3, [], [(b"k000", b"after")])     # written again while the flush runs
    e.flush_job.finish_now()
    e.flush_step()
    e.commit(4, [], [(b"k001", b"later")])     # and after it
    while not e.release_step(versions=7):
        pass
    assert sys.getrefcount(values[0]) == baseline - 1        # the chain's reference is gone
    assert e.read([b"k000", b"k001", b"k099"], 4) == [(b"after", 3), (b"later", 4), (values[199], 2)]
    assert e.read([b"k000", b"k001"], 2) == [(values[100], 2), (values[101], 2)]   # from disk now


def test_should_flush_dual_trigger_and_memory_pressure(open_engine, small_config):
    e = open_engine()
    assert not e.should_flush(e.last_flush_monotonic + 1000)     # nothing to flush
    e.commit(1, [], [(b"a", b"1")])
    assert not e.should_flush(e.last_flush_monotonic + 1)
    assert e.should_flush(e.last_flush_monotonic + small_config.flush_interval_secs)
    e.set_block(small_config.blocks_per_flush)
    assert e.should_flush(e.last_flush_monotonic)
    e.flush()
    assert not e.should_flush(e.last_flush_monotonic)
    e.config.max_resident_versions = 2
    e.commit(2, [], [(b"a", b"2"), (b"b", b"2")])
    assert e.should_flush(e.last_flush_monotonic)


def test_prune_keeps_newest_in_memory_and_on_disk_and_raises_horizon(open_engine):
    e = open_engine()
    for ts in range(1, 7):
        e.commit(ts, [], [(b"a", b"%d" % ts), (b"b%d" % ts, b"x")])
        if ts == 3:
            e.flush()
    e.pin(2)                                        # a deferred read at snapshot 2
    removed = e.prune(2)
    # dropped: a@1 (disk) and a@4 (memory); kept: a@6, a@5, a@2 (pinned) and a@3, the
    # newest row on disk (kept until the next flush + prune, see prune.py)
    assert removed == 2
    assert e.horizon == 5
    assert e.read([b"a"], 2) == [(b"2", 2)]         # the pinned snapshot still reads
    with pytest.raises(TooOld):
        e.read([b"a"], 4)
    e.unpin(2)
    with pytest.raises(TooOld):
        e.read([b"a"], 2)
    assert e.read([b"a"], 5) == [(b"5", 5)] and e.read([b"a"], 6) == [(b"6", 6)]
    s = e.stats()
    assert s["prune"]["versions_removed"] == 2 and s["horizon"] == 5
    e.close()
    e = open_engine()
    assert e.horizon == 5 and e.read([b"a", b"b1"], 6) == [(b"6", 6), (b"x", 1)]


def _disk_rows(engine, key: bytes) -> list:
    """(ts, value) of key's rows in `data`, newest first (value None = tombstone)."""
    prefix = enc(key)
    return [(split_version_key(vkey)[1], untag(row))
            for vkey, row in engine.storage.iterate("data", prefix=prefix)
            if vkey[:-8] == prefix]


def test_prune_drops_a_deleted_keys_rows_with_its_tombstone_and_it_stays_deleted(open_engine):
    """A delete used to stay on disk for good (the newest disk row was never dropped), so
    a store that creates and deletes keys grew without bound and scans walked the dead
    keys. A tombstone with nothing kept below it reads exactly as no row: it goes with
    the rows it deleted, in one batch, and the key stays deleted across a restart."""
    e = open_engine()
    e.commit(1, [], [(b"a", b"1"), (b"b", b"1")])
    e.commit(2, [], [(b"a", b"2")])
    e.commit(3, [], [(b"a", None)])                    # a deleted
    e.flush()
    assert [ts for ts, _ in _disk_rows(e, b"a")] == [3, 2, 1]
    assert e.prune(1) == 3                             # a@2, a@1 and the tombstone a@3
    assert _disk_rows(e, b"a") == [] and _disk_rows(e, b"b") == [(1, b"1")]
    assert e.read([b"a", b"b"], 3) == [(None, 0), (b"1", 1)]
    assert e.scan(None, None, 10, 3) == ([(b"b", b"1", 1)], False)
    assert e.stats()["keys"] == 1
    # the horizon is what dropping a@2 and a@1 needs, no more: at 3 a reads as deleted
    assert e.horizon == 3
    e.commit(4, [(b"a", 0)], [(b"a", b"4")])          # read version 0: absent, as before
    assert e.stats()["keys"] == 2
    e.close()
    e = open_engine()
    assert e.read([b"a", b"b"], 4) == [(b"4", 4), (b"1", 1)] and e.stats()["keys"] == 2
    e.commit(5, [], [(b"a", None)])
    e.close()
    e = open_engine()                                  # the delete replayed from the log
    assert e.read([b"a"], 5) == [(None, 0)] and e.stats()["keys"] == 1


def test_prune_keeps_a_tombstone_with_a_kept_version_below_it(open_engine):
    """Only a tombstone with no survivor below it goes: one above a version a pinned
    snapshot needs (or one of the `keep` newest) stays, or that version would read as
    the key's current value."""
    e = open_engine()
    e.commit(1, [], [(b"a", b"1")])
    e.commit(2, [], [(b"a", None)])
    e.flush()
    e.pin(1)
    assert e.prune(1) == 0
    assert [ts for ts, _ in _disk_rows(e, b"a")] == [2, 1]
    assert e.read([b"a"], 1) == [(b"1", 1)] and e.read([b"a"], 2) == [(None, 0)]
    e.unpin(1)
    assert e.prune(2) == 0                             # keep 2: a@1 is one of them
    assert e.read([b"a"], 2) == [(None, 0)]
    assert e.prune(1) == 2
    assert _disk_rows(e, b"a") == [] and e.read([b"a"], 2) == [(None, 0)]


def test_a_delete_still_in_memory_keeps_the_row_it_deletes_on_disk(open_engine):
    """The delete is not on disk yet: the live row below it is the newest disk row and
    stays (a crash replays the delete on top of it), until a flush writes the tombstone."""
    e = open_engine()
    e.commit(1, [], [(b"a", b"1")])
    e.flush()
    e.commit(2, [], [(b"a", None)])
    assert e.prune(1) == 0
    assert _disk_rows(e, b"a") == [(1, b"1")] and e.read([b"a"], 2) == [(None, 0)]
    e.flush()
    assert e.prune(1) == 2 and _disk_rows(e, b"a") == []
    assert e.read([b"a"], 2) == [(None, 0)] and e.stats()["keys"] == 0


def test_keys_created_and_deleted_all_the_time_leave_no_rows_behind(open_engine):
    """An event-sourced or VM state creates and deletes keys all the time: with flush and
    prune running, the rows on disk stay those of the live keys."""
    e = open_engine()
    ts = 0
    live = {}                                          # key -> (value, ts): the model
    for round_ in range(20):
        for i in range(50):
            ts += 1
            live[b"live-%d" % i] = (b"%d" % ts, ts)
            e.commit(ts, [], [(b"tmp-%d-%d" % (round_, i), b"x" * 20), (b"live-%d" % i, b"%d" % ts)])
        for i in range(50):
            ts += 1
            e.commit(ts, [], [(b"tmp-%d-%d" % (round_, i), None)])
        e.flush()
        e.prune(1)
    assert sorted(vkey for vkey, _ in e.storage.iterate("data")) == sorted(
        version_key(k, t) for k, (_, t) in live.items())   # one row per live key, no tmp key
    assert e.scan(None, None, 100, ts) == ([(k, v, t) for k, (v, t) in sorted(live.items())], False)


def test_a_flush_lets_rocksdb_delete_the_log_files_it_made_obsolete(open_engine, tmp_path):
    """RocksDB deletes a write-ahead log file only once every column family with rows in
    it has flushed them. A flush wrote `data` to SST files and truncated `log`, but `log`
    and `meta` kept their rows in memtables, so no log file was ever deleted: 6 MB more
    per round here, without end (until max_total_wal_size, gigabytes by default). With the
    default 64 MiB write buffers: small ones flush `log` on their own."""
    e = open_engine(config=EngineConfig(flush_on_start=False))
    path = tmp_path / "shard"
    value = b"v" * 3000
    ts = 0

    def log_bytes() -> int:
        total = 0
        for log in path.glob("*.log"):
            try:
                total += log.stat().st_size
            except FileNotFoundError:                # RocksDB deleted it meanwhile
                pass
        return total
    for _ in range(4):
        for i in range(2000):                        # ~6 MB of log records
            ts += 1
            e.commit(ts, [], [(b"k%03d" % (i % 500), value)])
            e.sync()
        assert log_bytes() > 5_000_000
        e.flush()
        deadline = time.monotonic() + 10             # RocksDB's threads delete them
        while log_bytes() > 1_000_000:
            assert time.monotonic() < deadline, f"log files kept: {log_bytes()} bytes"
            time.sleep(0.02)
    assert e.read([b"k000"], ts)[0][0] == value
