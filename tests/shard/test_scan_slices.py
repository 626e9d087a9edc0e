"""A scan walks a bounded number of rows per loop pass. A range of deleted keys not yet
pruned is rows to walk with nothing to list: a scan over a few hundred thousand of them
took seconds in one handler call, the shard answered nothing meanwhile, and the router
counted it dead (seen in a soak that creates and deletes keys). The engine scans in
slices (scan_slice, resuming at a key); the worker runs one slice per pass, its snapshot
pinned, and answers pings and txns in between."""
import time

import pytest

from shard import messages as m
from shard import worker as worker_module
from tests.shard.stand_in_peer import Peer, answer, send

CONFIG = {"flush": {"flush_on_start": False}, "prune": {"auto_interval_secs": 0},
          "node": {"busy_poll_us": 0}}


def fill(engine, start_ts=1):
    """Live, deleted (tombstones on disk, not pruned) and rewritten keys on disk, and
    newer versions and deletes in memory; returns the ts of the last commit."""
    ts = start_ts
    engine.commit(ts, [], [(b"k%03d" % i, b"v%d" % i) for i in range(120)])
    ts += 1
    engine.commit(ts, [], [(b"k%03d" % i, None) for i in range(120) if i % 3])      # deleted
    ts += 1
    engine.commit(ts, [], [(b"k%03d" % i, b"w%d" % i) for i in range(0, 120, 9)])    # rewritten
    engine.sync()
    engine.flush()
    ts += 1
    engine.commit(ts, [], [(b"k%03d" % i, b"m%d" % i) for i in range(1, 120, 11)]   # memory
                  + [(b"k%03d" % i, None) for i in range(0, 120, 27)] + [(b"j", b"1"), (b"z", b"2")])
    engine.sync()
    return ts


def whole_scan(at: int) -> dict:
    """The message of a shard scan of every key at snapshot `at` (rid 1 unless set)."""
    return {"op": m.SCAN, "rid": 1, "start": None, "end": None, "limit": 1000, "at": at}


def scan_in_slices(engine, start, end, limit, at, budget):
    items, slices = [], 0
    while True:
        got, more, resume = engine.scan_slice(start, end, limit - len(items), at, budget)
        items += got
        slices += 1
        if resume is None:
            return items, more, slices
        assert start is None or resume > start          # every slice moves on
        start = resume


@pytest.mark.parametrize("budget", [1, 2, 5, 17, 1000])
def test_a_scan_in_slices_lists_what_one_scan_lists(open_engine, budget):
    e = open_engine()
    last = fill(e)
    for at in (1, 2, last - 1, last):
        for start, end, limit in ((None, None, 1000), (b"k010", b"k090", 1000), (None, None, 7), (b"k5", None, 3)):
            items, more, slices = scan_in_slices(e, start, end, limit, at, budget)
            assert (items, more) == e.scan(start, end, limit, at), (at, start, end, limit)
            if budget == 1 and limit == 1000 and start is None:
                assert slices > 100                      # one key per slice: 120 on disk


def test_a_shard_answers_pings_while_a_long_scan_goes_on_and_the_scan_is_exact(booted_worker, monkeypatch):
    monkeypatch.setattr(worker_module, "SCAN_SLICE_ROWS", 10)
    w = booted_worker(CONFIG)
    at = fill(w.engine)
    expected = [list(it) for it in w.engine.scan(None, None, 1000, at)[0]]
    peer = Peer()
    send(w, peer, whole_scan(at))
    assert peer.replies == [] and w.engine.pins == {at: 1}
    passes = 1
    while not peer.replies:
        # a ping sent while the scan goes on is answered in the next pass
        send(w, peer, {"op": m.PING}, rid=100 + passes)
        passes += 1
        assert passes < 100
        if len(peer.replies) == 1:
            assert peer.replies.pop()["rid"] == 100 + passes - 1
    assert w.poll_timeout_ms() > 0 and passes > 5        # done: the loop sleeps again
    reply = answer(peer, 1)
    assert reply["ok"] and reply["items"] == expected and reply["more"] is False
    assert w.engine.pins == {}


def test_a_going_scan_keeps_its_snapshot_through_a_prune(booted_worker, monkeypatch):
    """The snapshot is pinned from the first slice to the answer: a prune in between keeps
    the versions the scan still has to read."""
    monkeypatch.setattr(worker_module, "SCAN_SLICE_ROWS", 10)
    w = booted_worker(CONFIG)
    at = fill(w.engine)
    expected = [list(it) for it in w.engine.scan(None, None, 1000, 1)[0]]     # the first state
    peer = Peer()
    send(w, peer, whole_scan(1))
    w.engine.flush()
    assert w.engine.prune(1) > 0 and w.engine.horizon > 1
    while not peer.replies:
        w.finish_pass()
    [reply] = peer.replies
    assert reply["ok"] and reply["items"] == expected
    assert w.engine.pins == {} and at > 1


def test_a_scan_past_its_deadline_is_unavailable_and_releases_its_snapshot(booted_worker, monkeypatch):
    monkeypatch.setattr(worker_module, "SCAN_SLICE_ROWS", 1)
    monkeypatch.setattr(worker_module, "SCAN_DEADLINE_SECS", 0.0)
    w = booted_worker(CONFIG)
    at = fill(w.engine)
    peer = Peer()
    send(w, peer, whole_scan(at))
    [reply] = peer.replies
    assert not reply["ok"] and reply["error"]["code"] == "unavailable"
    assert reply["error"]["message"] == "scan ran too long" and reply["error"]["retryable"]
    assert w.engine.pins == {}


def test_a_scan_deferred_on_a_prepared_key_gets_a_scans_deadline_once_it_goes_on(booted_worker, monkeypatch):
    """Deferred on a prepared key, a scan has the read wait (1 s by default) to be unblocked;
    once it goes on in slices it has a scan's deadline, or a long range would be answered
    "read waited too long on a prepared transaction" half-way."""
    monkeypatch.setattr(worker_module, "SCAN_SLICE_ROWS", 10)
    w = booted_worker(dict(CONFIG, router={"read_wait_secs": 5.0}))
    txn = fill(w.engine) + 1
    peer = Peer()
    send(w, peer, {"op": m.TXNS, "items": [[m.ITEM_PREPARE, txn, [], [[b"k050", b"x"]], [0]]]}, rid=1)
    send(w, peer, whole_scan(txn), rid=2)
    [d] = w.deferred
    assert d.deadline <= time.monotonic() + 5.0 and d.late != worker_module.SCAN_LATE
    send(w, peer, {"op": m.TXNS, "items": [[m.ITEM_ABORT_PREPARED, txn]]}, rid=3)
    [d] = w.deferred                                     # unblocked: going on in slices
    assert d.late == worker_module.SCAN_LATE
    assert d.deadline > time.monotonic() + worker_module.SCAN_DEADLINE_SECS - 5.0
    while not any(r["rid"] == 2 for r in peer.replies):
        w.finish_pass()
    reply = answer(peer, 2)
    assert reply["ok"] and reply["items"] == [list(it) for it in w.engine.scan(None, None, 1000, txn)[0]]
    assert w.engine.pins == {}
