"""A shard worker against what any peer of its socket can send: every bad message gets an
answer with the right error code, changes nothing, and nothing escapes the handlers (an
exception out of handle_frame, finish_pass or the status snapshot ends the real
process's loop). A real ShardWorker in this process (its RocksDB, its handlers, its Unix
socket where a test needs one); tests/node/test_shard_hostile_peer.py sends the same
messages to a real worker process. Found by an audit of the worker's message handling;
each test failed before the fix."""
import math
import socket
import time

import pytest

from shard import messages as m
from tests.shard.stand_in_peer import Peer, answer, send
from shard import worker as worker_module
from shard.link import HEADER


CONFIG = {"flush": {"flush_on_start": False}, "prune": {"auto_interval_secs": 0},
          "node": {"busy_poll_us": 0}, "router": {"read_wait_secs": 30.0}}


@pytest.fixture
def worker(booted_worker):
    return booted_worker(CONFIG)


def prepare_k(w, peer, txn=10):
    send(w, peer, {"op": m.TXNS, "items": [[m.ITEM_PREPARE, txn, [], [[b"k", b"v"]], [0]]]}, rid=1)
    assert answer(peer, 1)["results"] == [None]


@pytest.mark.parametrize("op", [[], {"x": 1}, ["read"]])
def test_an_unhashable_op_is_bad_request(worker, op):
    peer = Peer()
    send(worker, peer, {"op": op}, rid=5)
    send(worker, peer, {"op": m.MULTI, "msgs": [{"op": op, "rid": 6}]})
    for rid in (5, 6):
        reply = answer(peer, rid)
        assert not reply["ok"] and reply["error"]["code"] == "bad_request"
        assert "unknown op" in reply["error"]["message"]
    send(worker, peer, {"op": m.PING}, rid=7)
    assert answer(peer, 7)["ok"]


@pytest.mark.parametrize("msg", [
    {"op": m.COMMIT, "ts": 1e30, "reads": [], "writes": [[b"k", b"v"]]},
    {"op": m.COMMIT, "ts": True, "reads": [], "writes": [[b"k", b"v"]]},
    {"op": m.PREPARE, "txn": 3, "ts": 1e30, "reads": [], "writes": [[b"k", b"v"]], "participants": [0]},
    {"op": m.PREPARE, "txn": 3.5, "ts": 4, "reads": [], "writes": [[b"k", b"v"]], "participants": [0]},
    {"op": m.BLOCK, "height": 1e30},
    {"op": m.BLOCK, "height": -1},
    {"op": m.READ, "keys": [b"k"], "at": math.inf},
    {"op": m.READ, "keys": [b"k"], "at": math.nan},
    {"op": m.SCAN, "start": None, "end": None, "limit": 1e9, "at": 1},
    {"op": m.PRUNE, "keep_versions": 2.0},
    {"op": m.FORGET, "txns": [1e30]},
    {"op": m.RECOVER_INFO, "txns": [math.inf]},
], ids=lambda msg: f"{msg['op']}")
def test_a_number_that_is_not_a_wire_int_is_bad_request_and_changes_nothing(worker, msg):
    peer = Peer()
    before = worker.engine.stats()
    send(worker, peer, msg, rid=9)
    reply = answer(peer, 9)
    assert not reply["ok"] and reply["error"]["code"] == "bad_request", reply
    after = worker.engine.stats()
    assert (after["max_ts"], after["block_height"]) == (before["max_ts"], before["block_height"])
    m.pack(worker.snapshot())              # the status push that carries them still packs
    send(worker, peer, {"op": m.TXNS, "items": [[m.ITEM_COMMIT, 5, [], [[b"k", b"v5"]]]]}, rid=10)
    assert answer(peer, 10)["results"] == [None]       # and the shard goes on committing


def test_the_engine_refuses_a_ts_above_the_largest(worker):
    """msgpack cannot carry 2^64, but the engine is an API of its own (the benchmarks,
    the tests): a ts whose version key could not be encoded, or a height no meta row can
    hold, is refused rather than failing at the next sync or flush."""
    from shard.errors import BadRequest
    e = worker.engine
    for call in (lambda: e.commit(2**64, [], [(b"k", b"v")]),
                 lambda: e.prepare(7, 2**64, [], [(b"j", b"v")], [0]),
                 lambda: e.set_block(2**64)):
        with pytest.raises(BadRequest):
            call()
    e.prepare(7, 5, [], [(b"j", b"v")], [0])
    with pytest.raises(BadRequest):
        e.commit_prepared(7, 2**64)
    e.sync()
    assert (e.max_ts, e.block_height) == (5, 0)


def test_a_deferred_read_without_rid_is_answered_when_unblocked(worker):
    peer = Peer()
    prepare_k(worker, peer)
    send(worker, peer, {"op": m.READ, "keys": [b"k"], "at": 20})    # no rid: waits on txn 10
    assert len(worker.deferred) == 1
    send(worker, peer, {"op": m.COMMIT_PREPARED, "txn": 10, "ts": 10}, rid=2)
    assert answer(peer, 2)["ok"] and worker.deferred == []
    reply = answer(peer, None)
    assert not reply["ok"] and reply["error"]["code"] == "bad_request"
    assert worker.engine.pins == {}                      # its pin was released


def test_a_malformed_read_is_bad_request_whether_or_not_it_was_deferred(worker):
    peer = Peer()
    send(worker, peer, {"op": m.READ, "keys": [b"k", b""], "at": 20}, rid=2)
    assert answer(peer, 2)["error"]["code"] == "bad_request"
    prepare_k(worker, peer)
    send(worker, peer, {"op": m.READ, "keys": [b"k", b""], "at": 20}, rid=3)
    assert len(worker.deferred) == 1
    errors = worker.counts["error"]
    send(worker, peer, {"op": m.COMMIT_PREPARED, "txn": 10, "ts": 10}, rid=4)
    assert answer(peer, 3)["error"]["code"] == "bad_request"
    assert worker.counts["error"] == errors              # not counted as an internal error


def test_a_deferred_read_blocked_again_keeps_its_place_and_gets_its_value(worker):
    peer = Peer()
    prepare_k(worker, peer, txn=10)
    send(worker, peer, {"op": m.READ, "keys": [b"k"], "at": 30}, rid=2)
    deadline = worker.deferred[0].deadline
    send(worker, peer, {"op": m.TXNS, "items": [[m.ITEM_COMMIT_PREPARED, 10, 10],
                                                [m.ITEM_PREPARE, 20, [], [[b"k", b"w"]], [0]]]}, rid=3)
    assert [d.deadline for d in worker.deferred] == [deadline]       # the same wait, not a new one
    send(worker, peer, {"op": m.COMMIT_PREPARED, "txn": 20, "ts": 20}, rid=4)
    assert answer(peer, 2)["values"] == [b"w"] and answer(peer, 2)["versions"] == [20]


def test_a_peer_that_reads_no_replies_is_not_read_until_they_drain(booted_worker, monkeypatch):
    """Backpressure on a real Unix socket: a peer sends reads of a 10 KB value and reads
    nothing. Past the cap of unsent reply bytes the worker stops reading it (its requests
    wait in the socket), so its memory stays bounded; once the peer reads, every reply
    comes, in order."""
    cap = 256 << 10
    monkeypatch.setattr(worker_module, "PEER_OUT_CAP", cap)
    w = booted_worker(CONFIG)
    value = b"x" * 10_000
    w.engine.commit(1, [], [(b"big", value)])
    w.engine.sync()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(w.endpoint)
    sock.setblocking(False)
    requests = 2000                    # 20 MB of replies if nothing held them back

    def frame(rid):
        body = m.pack({"op": m.READ, "rid": rid, "keys": [b"big"], "at": 1, "inc": w.inc})
        return HEADER.pack(len(body)) + body

    sent = 0
    for _ in range(10 * requests):     # bounded: the worker stops reading long before
        try:
            sock.send(frame(sent))     # one request per send: the whole frame or nothing
            sent += 1
            if sent == requests:
                break
        except BlockingIOError:        # the socket buffer is full: the worker reads nothing
            pass
        if sent % 5 == 0:
            w.loop_pass()              # a pass per 5 requests, as if they came over time
    (stream,) = w.peers.values()
    assert sent < requests and stream.backlogged
    # everything unsent is in the outbuf: at most the cap plus one pass's replies
    assert len(stream.outbuf) <= cap + 5 * (len(value) + 100)
    assert w.snapshot()["peers_backlogged"] == 1
    # now the peer reads: the worker resumes, and every reply comes, in request order
    sock.setblocking(True)
    sock.settimeout(10)
    buf = bytearray()
    rids = []
    deadline = time.monotonic() + 60
    while len(rids) < sent and time.monotonic() < deadline:
        w.loop_pass()
        try:
            buf += sock.recv(1 << 20)
        except socket.timeout:
            continue
        while len(buf) >= 4:
            (n,) = HEADER.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            for reply in m.replies_of(m.unpack(bytes(buf[4:4 + n]))):
                assert reply["ok"] and reply["values"] == [value]
                rids.append(reply["rid"])
            del buf[:4 + n]
    sock.close()
    assert rids == list(range(sent))
