"""ShardEngine: open/identity, reads at snapshots, scans, OCC commit, deletes, recovery."""
import pytest

from shard.config import EngineConfig
from shard.errors import BadRequest, Conflict, StorageMismatch


def test_identity_is_checked_on_reopen(open_engine, tmp_path):
    e = open_engine(shard_id=1, shard_count=3)
    e.close()
    with pytest.raises(StorageMismatch, match="holds shard 1 of 3.*opened as shard 0 of 3"):
        open_engine(shard_id=0, shard_count=3)
    with pytest.raises(StorageMismatch, match="shard 1 of 2"):
        open_engine(shard_id=1, shard_count=2)
    assert open_engine(shard_id=1, shard_count=3).shard_id == 1


def test_snapshot_reads_versions_and_deletes(open_engine):
    e = open_engine()
    e.commit(10, [], [(b"a", b"1"), (b"b", b"2")])
    e.commit(20, [(b"a", 10)], [(b"a", b"3"), (b"b", None)])
    e.sync()
    assert e.read([b"a", b"b", b"zz"], 9) == [(None, 0)] * 3
    assert e.read([b"a", b"b"], 15) == [(b"1", 10), (b"2", 10)]
    assert e.read([b"a", b"b"], 20) == [(b"3", 20), (None, 0)]
    assert e.stats()["keys"] == 1


def test_conflict_lists_keys_and_writes_nothing(open_engine):
    e = open_engine()
    e.commit(1, [], [(b"a", b"1"), (b"b", b"1")])
    with pytest.raises(Conflict) as info:
        e.commit(2, [(b"a", 0), (b"b", 1), (b"c", 5)], [(b"b", b"2"), (b"d", b"x")])
    assert sorted(info.value.keys) == [b"a", b"c"]
    assert info.value.to_error()["code"] == "conflict"
    assert e.read([b"b", b"d"], 2) == [(b"1", 1), (None, 0)]
    e.commit(2, [(b"a", 1), (b"zz", 0)], [(b"a", None)])
    with pytest.raises(Conflict):          # deleted key reads as version 0
        e.validate([(b"a", 1)])
    e.validate([(b"a", 0)])


def test_bad_input_is_refused_and_changes_nothing(open_engine):
    e = open_engine()
    e.commit(5, [], [(b"a", b"1")])
    for ts, reads, writes in [(4, [], [(b"a", b"x")]),          # ts not increasing
                              (6, [], [(b"", b"x")]),           # empty key
                              (6, [], [("str", b"x")]),
                              (6, [], [(b"a", 7)]),
                              (6, [(b"a", -1)], [(b"a", b"x")]),
                              ("6", [], [(b"a", b"x")])]:
        with pytest.raises(BadRequest):
            e.commit(ts, reads, writes)
    with pytest.raises(BadRequest):
        e.read([b"a"], -1)
    assert e.read([b"a"], 100) == [(b"1", 5)] and e.max_ts == 5


def test_scan_merges_memory_and_disk_skips_deleted(open_engine):
    e = open_engine()
    e.commit(1, [], [(bytes([c]), b"v1") for c in b"abcdef"])
    e.flush()
    e.commit(2, [], [(b"b", None), (b"d", b"v2"), (b"g", b"v2"), (b"a\x00", b"z")])
    items, more = e.scan(None, None, 100, 2)
    assert [(k, v, t) for k, v, t in items] == [
        (b"a", b"v1", 1), (b"a\x00", b"z", 2), (b"c", b"v1", 1), (b"d", b"v2", 2),
        (b"e", b"v1", 1), (b"f", b"v1", 1), (b"g", b"v2", 2)]
    assert not more
    items, more = e.scan(b"b", b"f", 2, 2)
    assert [k for k, _, _ in items] == [b"c", b"d"] and more
    items, more = e.scan(b"b", b"f", 10, 1)
    assert [k for k, _, _ in items] == [b"b", b"c", b"d", b"e"] and not more


def test_recovery_replays_synced_commits_only(open_engine):
    e = open_engine()
    e.commit(1, [], [(b"a", b"1")])
    e.sync()
    e.commit(2, [], [(b"b", b"2"), (b"a", None)])
    e.sync()
    e.commit(3, [], [(b"c", b"lost")])        # staged, never synced: a crash loses it
    e.log.records.clear()
    e.close()
    e = open_engine()
    assert e.read([b"a", b"b", b"c"], 10) == [(None, 0), (b"2", 2), (None, 0)]
    assert e.max_ts == 2 and e.stats()["keys"] == 1


def test_replay_after_partial_flush_is_idempotent(open_engine):
    """Rows written by a flush that crashed before its meta record are replayed again."""
    e = open_engine()
    e.commit(1, [], [(b"a", b"1"), (b"b", b"1")])
    e.commit(2, [], [(b"a", None), (b"c", b"2")])
    e.start_flush()
    job = e.flush_job
    while len(job.frozen) and job.ops < 4:       # write the data rows, then "crash"
        if e.flush_job.step():
            break
    e.storage.flush(("data",))
    e.flush_job = None
    e.storage.close()
    e.storage = None
    e = open_engine()
    assert e.read([b"a", b"b", b"c"], 2) == [(None, 0), (b"1", 1), (b"2", 2)]
    assert e.stats()["keys"] == 2
    e.flush()
    e.close()
    e = open_engine()
    assert e.read([b"a", b"b", b"c"], 2) == [(None, 0), (b"1", 1), (b"2", 2)]
    assert e.stats()["keys"] == 2 and e.replayed_records == 0


def test_block_height_is_durable_and_must_increase(open_engine):
    e = open_engine()
    e.set_block(5)
    with pytest.raises(BadRequest):
        e.set_block(5)
    e.sync()
    e.close()
    e = open_engine()
    assert e.block_height == 5 and e.stats()["block_height"] == 5


def test_config_from_dict_reads_sections_with_defaults():
    cfg = EngineConfig.from_dict({"durability": {"mode": "fsync"}, "flush": {"blocks_per_flush": 7},
                                  "rocksdb": {"compression": "none"}})
    assert cfg.fsync and cfg.blocks_per_flush == 7 and cfg.flush_interval_secs == 10
    assert cfg.rocksdb["compression"] == "none" and cfg.rocksdb["bloom_bits_per_key"] == 10
    assert EngineConfig.from_dict({}).keep_versions == 3
    with pytest.raises(ValueError, match="durability"):
        EngineConfig.from_dict({"durability": {"mode": "maybe"}})
