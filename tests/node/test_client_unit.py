"""Client behaviour a real node cannot be made to show on demand (replies out of order,
no reply at all, error envelopes of every code), driven by a real ZeroMQ ROUTER socket
in the test that plays the node's part frame by frame."""
import msgpack
import pytest
import zmq

from node import client as kvclient
from node.client import (BadRequest, Client, Conflict, Internal, NotFound, ShardKVError,
                         Timeout, TooLarge, TooOld, Unavailable, retry)
from node.protocol import encode_error, encode_reply


@pytest.fixture
def server():
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield FakeNode(sock, f"tcp://127.0.0.1:{port}")
    sock.close(linger=0)


class FakeNode:
    def __init__(self, sock, endpoint):
        self.sock, self.endpoint = sock, endpoint

    def __getattr__(self, name):
        return getattr(self.sock, name)


def take(sock, n):
    """n requests as (identity, decoded map)."""
    out = []
    for _ in range(n):
        assert sock.poll(5000), "client request did not arrive"
        ident, frame = sock.recv_multipart()
        out.append((ident, msgpack.unpackb(frame)))
    return out


def test_pipelined_replies_out_of_order_are_paired_by_id(server):
    with Client(server.endpoint, timeout=5) as kv:
        rids = [kv.send("ping") for _ in range(3)]
        reqs = take(server, 3)
        assert [r["id"] for _, r in reqs] == rids
        for ident, req in reversed(reqs):
            server.send_multipart([ident, encode_reply(req["id"], n=req["id"])])
        assert [kv.recv(rid)["n"] for rid in rids] == rids


def test_pipeline_returns_results_and_errors_in_request_order(server):
    with Client(server.endpoint, timeout=5) as kv:
        import threading

        def serve():
            for ident, req in take(server, 4)[::-1]:
                if req["id"] % 2:
                    server.send_multipart([ident, encode_reply(req["id"], echo=req["op"])])
                else:
                    server.send_multipart([ident, encode_error(req["id"], "conflict", "x", keys=[b"k"])])
        t = threading.Thread(target=serve)
        t.start()
        results = kv.pipeline([("ping", {}), ("stats", {}), ("flush", {}), ("ping", {})], window=8)
        t.join()
        assert results[0] == {"echo": "ping"} and results[2] == {"echo": "flush"}
        assert isinstance(results[1], Conflict) and results[1].keys == [b"k"]
        assert isinstance(results[3], Conflict)


@pytest.mark.parametrize("code,cls,retryable", [
    ("bad_request", BadRequest, False), ("too_large", TooLarge, False),
    ("conflict", Conflict, True), ("too_old", TooOld, False), ("not_found", NotFound, False),
    ("unavailable", Unavailable, True), ("internal", Internal, False)])
def test_every_error_code_raises_its_exception(server, code, cls, retryable):
    with Client(server.endpoint, timeout=5) as kv:
        rid = kv.send("txn", writes=[])
        (ident, req), = take(server, 1)
        server.send_multipart([ident, encode_error(req["id"], code, "why", outcome="aborted")])
        with pytest.raises(cls) as info:
            kvclient._result(kv.recv(rid))
        assert info.value.code == code and info.value.retryable is retryable
        assert info.value.message == "why" and str(info.value) == f"{code}: why"


def test_unknown_error_code_is_a_base_error():
    exc = kvclient.error_from_reply({"code": "novel", "message": "m", "retryable": True})
    assert type(exc) is ShardKVError and exc.code == "novel" and exc.retryable


def test_timeout_raises_unavailable_and_resets_the_socket(server):
    with Client(server.endpoint, timeout=0.2) as kv:
        rid = kv.send("ping")
        (ident, req), = take(server, 1)
        with pytest.raises(Timeout) as info:
            kv.recv(rid)
        assert isinstance(info.value, Unavailable) and isinstance(info.value, TimeoutError)
        assert info.value.outcome == "unknown" and info.value.retryable
        # the late reply goes to the dropped socket; the new request gets its own answer
        server.send_multipart([ident, encode_reply(req["id"], late=True)])
        rid2 = kv.send("ping")
        (ident2, req2), = take(server, 1)
        assert ident2 != ident
        server.send_multipart([ident2, encode_reply(req2["id"], late=False)])
        assert kv.recv(rid2) == {"id": rid2, "ok": True, "late": False}


def test_request_over_max_frame_bytes_is_refused_locally(server):
    with Client(server.endpoint, max_frame_bytes=100) as kv:
        with pytest.raises(TooLarge):
            kv.put(b"k", b"v" * 200)
        assert not server.poll(100)


def test_get_put_shapes_on_the_wire(server):
    import threading
    seen = []

    def serve():
        for _ in range(2):
            (ident, req), = take(server, 1)
            seen.append(req)
            if req["op"] == "get":
                server.send_multipart([ident, encode_reply(req["id"], ts=5, values=[b"1", None],
                                                           versions=[4, 0])])
            else:
                server.send_multipart([ident, encode_reply(req["id"], commit_ts=6)])
    t = threading.Thread(target=serve)
    t.start()
    with Client(server.endpoint, timeout=5) as kv:
        got = kv.get(["a", b"b"], at=5)
        assert kv.txn(reads={"a": 4}, writes=[("a", "2"), (b"b", None)], block=3) == 6
    t.join()
    assert (got.ts, got.value, got.version, got.as_dict()) == (5, b"1", 4, {b"a": b"1", b"b": None})
    assert list(got) == [(b"a", b"1", 4), (b"b", None, 0)]
    assert seen[0]["keys"] == [b"a", b"b"] and seen[0]["at"] == 5
    assert seen[1]["reads"] == [[b"a", 4]] and seen[1]["block"] == 3
    assert seen[1]["writes"] == [[b"a", b"2"], [b"b", None]]


def test_retry_is_bounded_and_only_retries_retryable():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        raise Unavailable("down")
    with pytest.raises(Unavailable):
        retry(flaky, attempts=4, backoff=0.1, max_backoff=0.3, sleep=sleeps.append)
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0.05 <= s <= 0.3 for s in sleeps) and sleeps[2] >= 0.15

    calls.clear()

    def bad():
        calls.append(1)
        raise BadRequest("no")
    with pytest.raises(BadRequest):
        retry(bad, attempts=5, sleep=sleeps.append)
    assert len(calls) == 1

    outcomes = iter([Conflict("c"), 7])

    def then_ok():
        item = next(outcomes)
        if isinstance(item, Exception):
            raise item
        return item
    assert retry(then_ok, attempts=2, sleep=lambda s: None) == 7


def test_curve_client_talks_to_a_curve_server():
    ctx = zmq.Context.instance()
    server_public, server_secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_server = True
    sock.curve_secretkey = server_secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=5, server_public_key=server_public) as kv:
            rid = kv.send("ping")
            assert sock.poll(5000)
            ident, frame = sock.recv_multipart()
            sock.send_multipart([ident, encode_reply(msgpack.unpackb(frame)["id"], version=1)])
            assert kv.recv(rid)["version"] == 1
        # without the server key the handshake never completes: no request arrives
        with Client(f"tcp://127.0.0.1:{port}", timeout=0.3) as plain:
            plain.send("ping")
            assert not sock.poll(300)
    finally:
        sock.close(linger=0)


class RecordingSocket:
    """The client's socket, recording the timeout of every poll."""

    def __init__(self, sock):
        self.sock, self.timeouts = sock, []

    def poll(self, timeout, flags=zmq.POLLIN):
        self.timeouts.append(timeout)
        return self.sock.poll(timeout, flags)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_busy_polling_waits_for_the_reply_without_a_blocking_poll(server):
    with Client(server.endpoint, timeout=5, busy_poll_us=2_000_000) as kv:
        kv._sock = recording = RecordingSocket(kv._sock)
        rid = kv.send("ping")
        (ident, req), = take(server, 1)
        server.send_multipart([ident, encode_reply(req["id"], pong=True)])
        assert kv.recv(rid)["pong"] is True
        assert recording.timeouts and set(recording.timeouts) == {0}


def test_without_busy_polling_the_wait_is_one_blocking_poll(server):
    with Client(server.endpoint, timeout=5) as kv:
        kv._sock = recording = RecordingSocket(kv._sock)
        rid = kv.send("ping")
        (ident, req), = take(server, 1)
        server.send_multipart([ident, encode_reply(req["id"], pong=True)])
        assert kv.recv(rid)["pong"] is True
        assert recording.timeouts[0] > 0


def test_busy_polling_still_times_out(server):
    with Client(server.endpoint, timeout=0.2, busy_poll_us=50_000) as kv:
        kv._sock = recording = RecordingSocket(kv._sock)
        with pytest.raises(Timeout):
            kv.call("ping")                          # the fake node never answers
        assert recording.timeouts[0] == 0 and recording.timeouts[-1] > 0


@pytest.mark.parametrize("bad", [-1, 1.5, "500"])
def test_busy_poll_us_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="busy_poll_us"):
        Client("tcp://127.0.0.1:1", busy_poll_us=bad)


def serve_script(server, answers):
    """Answer requests in a thread: answers[i](req) -> reply frame, or None for no reply."""
    import threading
    seen = []

    def serve():
        for answer in answers:
            (ident, req), = take(server, 1)
            seen.append(req)
            frame = answer(req)
            if frame is not None:
                server.send_multipart([ident, frame])
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return seen, t


def counter_read(req):
    return encode_reply(req["id"], ts=7, values=[b"1"], versions=[7])


def increment(tx):
    tx.put(b"counter", str(int(tx.get(b"counter")) + 1))


@pytest.mark.parametrize("outcome", ["unknown", None])
def test_run_transaction_does_not_run_again_a_commit_that_may_have_committed(server, outcome):
    """The commit's reply says it may have applied: running the read-modify-write again
    would read its own write and add 1 twice (an audit saw the counter at 2 through a proxy
    that lost the first reply). It is raised instead, with no second txn sent."""
    extra = {} if outcome is None else {"outcome": outcome}
    seen, t = serve_script(server, [counter_read,
                                    lambda req: encode_error(req["id"], "unavailable", "lost", True, **extra)])
    with Client(server.endpoint, timeout=5) as kv:
        with pytest.raises(Unavailable) as err:
            kv.run_transaction(increment, attempts=5, backoff=0.001)
    t.join(5)
    assert err.value.retryable is False
    assert [r["op"] for r in seen] == ["get", "txn"]


def test_run_transaction_does_not_run_again_a_commit_that_timed_out(server):
    seen, t = serve_script(server, [counter_read, lambda req: None])
    with Client(server.endpoint, timeout=0.3) as kv:
        with pytest.raises(Timeout):
            kv.run_transaction(increment, attempts=5, backoff=0.001)
    t.join(5)
    assert [r["op"] for r in seen] == ["get", "txn"]
    assert not server.poll(100)          # and no third request (a re-run) came after them


def test_run_transaction_runs_again_after_a_conflict_or_a_commit_that_had_no_effect(server):
    seen, t = serve_script(server, [
        counter_read, lambda req: encode_error(req["id"], "conflict", "changed", True, keys=[b"counter"]),
        counter_read, lambda req: encode_error(req["id"], "unavailable", "shard down", True, outcome="aborted"),
        counter_read, lambda req: encode_reply(req["id"], commit_ts=9)])
    with Client(server.endpoint, timeout=5) as kv:
        kv.run_transaction(increment, attempts=5, backoff=0.001)
    t.join(5)
    assert [r["op"] for r in seen] == ["get", "txn"] * 3
    assert seen[-1]["writes"] == [[b"counter", b"2"]]


def test_a_transaction_refuses_writes_after_its_commit(server):
    """A put after an explicit commit() inside `with kv.transaction()` was dropped silently."""
    seen, t = serve_script(server, [lambda req: encode_reply(req["id"], commit_ts=3)])
    with Client(server.endpoint, timeout=5) as kv:
        with pytest.raises(RuntimeError, match="committed"):
            with kv.transaction() as tx:
                tx.put(b"a", b"1")
                assert tx.commit() == 3
                tx.put(b"b", b"2")
        with pytest.raises(RuntimeError):
            tx.get(b"a")
    t.join(5)
    assert [r["op"] for r in seen] == ["txn"]


@pytest.mark.parametrize("bad", [100, 3.5, None, ["k"]])
def test_keys_and_values_must_be_bytes_or_str(server, bad):
    """bytes(100) is 100 zero bytes: an int value was stored as NULs, an int key written as
    one (and a huge int allocated gigabytes). Nothing is sent."""
    with Client(server.endpoint, timeout=5) as kv:
        with pytest.raises(TypeError, match="bytes or str"):
            kv.put(b"k", bad) if bad is not None else kv.put(bad, b"v")
        with pytest.raises(TypeError):
            kv.get([b"k", 7])
        tx = kv.transaction().__enter__()
        with pytest.raises(TypeError):
            tx.put(b"k", 100)
        if bad is not None:
            with pytest.raises(TypeError, match="bytes or str"):
                kv.txn(writes={b"k": bad})
            with pytest.raises(TypeError, match="bytes or str"):
                kv.batch([{"writes": [(b"k", bad)]}])
    assert not server.poll(100)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "5", True])
def test_the_timeout_must_be_a_number_of_seconds(timeout):
    """An infinite one crashed the first reply wait (int(inf * 1000))."""
    with pytest.raises(ValueError, match="timeout"):
        Client("tcp://127.0.0.1:1", timeout=timeout)
