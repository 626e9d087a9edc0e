"""Flush (incremental, with commits in between) and prune (memory + disk, pins, horizon)."""
import pytest

from shard.errors import TooOld


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
