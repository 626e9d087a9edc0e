"""Prepared transactions: locks, blocked reads, durable prepared records and outcomes."""
import pytest

from shard.errors import BadRequest, Blocked, Conflict


def test_prepared_keys_conflict_writers_and_block_later_readers(open_engine):
    e = open_engine()
    e.commit(1, [], [(b"a", b"1"), (b"r", b"1")])
    e.prepare(7, 5, [(b"r", 1)], [(b"a", b"2"), (b"n", b"new")], [0, 1])
    with pytest.raises(Conflict):
        e.commit(6, [], [(b"a", b"x")])
    with pytest.raises(Conflict):
        e.commit(6, [], [(b"r", b"x")])             # read-locked keys refuse writers too
    with pytest.raises(Conflict):
        e.validate([(b"n", 0)])
    e.validate([(b"r", 1)])                          # read/read does not conflict
    with pytest.raises(Blocked) as info:
        e.read([b"a"], 5)
    assert info.value.txn_ids == [7]
    with pytest.raises(Blocked):
        e.scan(b"m", None, 10, 9)
    with pytest.raises(Blocked):                     # an empty bound is no bound
        e.scan(b"", b"", 10, 9)
    assert e.read([b"a", b"n", b"r"], 4) == [(b"1", 1), (None, 0), (b"1", 1)]
    assert e.read([b"r"], 9) == [(b"1", 1)]         # only read-locked: no block
    e.commit(8, [], [(b"z", b"ok")])                 # other keys commit meanwhile
    e.commit_prepared(7, 5)
    e.commit_prepared(7, 5)                          # idempotent
    assert e.read([b"a", b"n"], 9) == [(b"2", 5), (b"new", 5)]
    assert e.outcome(7) == 5


def test_prepared_state_survives_restart_then_commit(open_engine):
    e = open_engine()
    e.prepare(3, 10, [], [(b"k", b"v")], [0, 2])
    e.prepare(4, 11, [], [(b"j", b"w")], [0, 1])
    e.sync()
    e.close()
    e = open_engine()
    assert e.prepared() == [{"txn": 3, "ts": 10, "participants": [0, 2]},
                            {"txn": 4, "ts": 11, "participants": [0, 1]}]
    assert e.max_ts == 11
    with pytest.raises(Conflict):
        e.commit(12, [], [(b"k", b"x")])
    e.commit_prepared(3, 10)
    e.abort_prepared(4)
    e.abort_prepared(4)
    e.sync()
    e.close()
    e = open_engine()
    assert e.prepared() == [] and e.outcome(3) == 10
    assert e.read([b"k", b"j"], 20) == [(b"v", 10), (None, 0)]
    e.flush()
    e.forget([3])
    e.sync()
    e.close()
    e = open_engine()
    assert e.outcome(3) is None and e.read([b"k"], 20) == [(b"v", 10)]


def test_prepare_conflicts_write_nothing(open_engine):
    e = open_engine()
    e.commit(1, [], [(b"a", b"1")])
    e.prepare(1, 2, [], [(b"a", b"2")], [0])
    with pytest.raises(Conflict):
        e.prepare(2, 3, [(b"a", 1)], [(b"b", b"x")], [0])
    with pytest.raises(Conflict):
        e.prepare(2, 3, [(b"q", 9)], [(b"b", b"x")], [0])
    assert e.prepared() == [{"txn": 1, "ts": 2, "participants": [0]}]
    e.abort_prepared(1)
    assert e.read([b"a", b"b"], 5) == [(b"1", 1), (None, 0)]
    with pytest.raises(BadRequest):
        e.commit_prepared(1, 2)


def test_prepare_reports_every_conflict_and_rejects_bad_input_without_locking(open_engine):
    e = open_engine()
    e.commit(1, [], [(b"a", b"1"), (b"b", b"1"), (b"c", b"1")])
    e.prepare(1, 2, [], [(b"a", b"2"), (b"b", b"2")], [0])
    # read of a write-locked key, write of a locked key, stale read version: all listed
    with pytest.raises(Conflict) as info:
        e.prepare(2, 3, [(b"a", 1), (b"c", 7)], [(b"b", b"x")], [0])
    assert info.value.keys == [b"a", b"b", b"c"]
    for reads, writes, ts in (([(b"c", -1)], [], 4), ([(b"c", 1)], [(b"", b"x")], 4),
                              ([(b"c", 1, 2)], [], 4), ([(b"c", 1)], [(b"d", 5)], 4),
                              ([(b"c", 1)], [(b"d", b"x")], 2)):
        with pytest.raises(BadRequest):
            e.prepare(3, ts, reads, writes, [0])
    assert [p["txn"] for p in e.prepared()] == [1]
    e.commit(5, [(b"c", 1)], [(b"c", b"5"), (b"d", b"5")])   # c and d were never locked
    e.prepare(3, 6, [(b"c", 5)], [(b"d", b"6")], [0])
    e.commit_prepared(3, 6)
    assert e.read([b"c", b"d"], 6) == [(b"5", 5), (b"6", 6)]


def finish_flush(e):
    while not e.flush_step():
        pass


def test_2pc_state_survives_a_flush_that_truncates_the_log(open_engine):
    """The 2PC records live in the commit log; a flush drops the log rows it covers and
    keeps the prepared txns and outcomes as a snapshot in meta instead."""
    e = open_engine()
    e.commit(1, [], [(b"k", b"1")])
    e.prepare(2, 2, [(b"k", 1)], [(b"a", b"A")], [0, 1])
    e.prepare(3, 3, [], [(b"b", b"B")], [0, 1])
    e.commit_prepared(2, 2)
    e.sync()
    e.flush()
    assert list(e.storage.iterate("log")) == []
    e.close()
    e = open_engine()
    assert e.prepared() == [{"txn": 3, "ts": 3, "participants": [0, 1]}]
    assert e.outcome(2) == 2 and e.max_ts == 3
    assert e.read([b"a", b"k"], 5) == [(b"A", 2), (b"1", 1)]
    with pytest.raises(Conflict):
        e.commit(4, [], [(b"b", b"x")])              # still write-locked by txn 3
    e.commit_prepared(3, 3)
    e.forget([2])
    e.sync()
    e.flush()
    e.close()
    e = open_engine()
    assert e.prepared() == [] and e.outcome_txns() == [3]
    assert e.read([b"a", b"b"], 5) == [(b"A", 2), (b"B", 3)]


def test_replay_over_a_newer_snapshot_keeps_the_locks_of_prepared_txns(open_engine):
    """A flush snapshots the 2PC state after its log rows; replaying those rows over it
    must not leave a key unlocked: here txn 5 locked b, aborted, and txn 6 locked b."""
    e = open_engine()
    e.commit(1, [], [(b"a", b"1")])
    e.sync()
    e.start_flush()
    e.prepare(5, 2, [], [(b"b", b"x")], [0, 1])
    e.abort_prepared(5)
    e.prepare(6, 3, [(b"a", 1)], [(b"b", b"y")], [0, 1])
    e.sync()
    finish_flush(e)
    e.close()
    e = open_engine()
    assert e.prepared() == [{"txn": 6, "ts": 3, "participants": [0, 1]}]
    assert e.locks[b"b"] == (6, 3, True)
    with pytest.raises(Conflict):
        e.commit(4, [], [(b"b", b"z")])
    with pytest.raises(Blocked):
        e.read([b"b"], 3)


def test_flush_snapshot_never_holds_an_outcome_whose_writes_are_not_durable(open_engine):
    """A commit_prepared staged when a flush finishes: after a crash the txn is either
    still prepared or committed with its writes, never committed without them."""
    e = open_engine()
    e.prepare(7, 1, [], [(b"k", b"v")], [0, 1])
    e.sync()
    e.start_flush()
    e.commit_prepared(7, 1)                           # staged, not synced
    finish_flush(e)
    e.log.records.clear()                             # crash: whatever is staged is lost
    e.log.meta.clear()
    e.close()
    e = open_engine()
    if e.outcome(7) is not None:
        assert e.read([b"k"], 1) == [(b"v", 1)]
    else:
        assert [p["txn"] for p in e.prepared()] == [7]
