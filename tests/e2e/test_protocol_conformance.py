"""PROTOCOL.md, checked from outside: one node started by `scripts/node` with the stock
config (flags for ports and data dir only), spoken to with raw msgpack frames over DEALER
and REQ sockets, as a client written from the protocol document alone would.
Every op and every error code that a client can provoke is exercised here."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import zlib
from pathlib import Path

import msgpack
import pytest
import zmq

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """`scripts/node` in its own session; stdout lines collected by a thread."""

    def __init__(self, data_dir: Path):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.metrics_port = free_port()
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.log = open(data_dir.parent / "node.log", "ab")
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "node"), "--data-dir", str(data_dir), "--shards", "2",
             "--listen", self.endpoint, "--metrics-port", str(self.metrics_port)],
            stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(60), f"no ready line; stdout: {self.lines}"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ready" in line:
                self.ready.set()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()


class Wire:
    """A DEALER (no delimiter) or REQ (empty delimiter) client sending one map per frame."""

    def __init__(self, endpoint: str, kind=zmq.DEALER):
        self.sock = zmq.Context.instance().socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 0

    def send_raw(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float = 15.0) -> dict:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def call(self, op: str, **fields) -> dict:
        self.next_id += 1
        self.send_raw(msgpack.packb({"op": op, "id": self.next_id, **fields}, use_bin_type=True))
        reply = self.recv()
        assert reply["id"] == self.next_id
        return reply

    def ok(self, op: str, **fields) -> dict:
        reply = self.call(op, **fields)
        assert reply["ok"] is True, reply
        return reply

    def error(self, op: str, code: str, **fields) -> dict:
        reply = self.call(op, **fields)
        assert reply["ok"] is False, reply
        error = reply["error"]
        assert error["code"] == code, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["retryable"], bool)
        return error


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = Node(tmp_path_factory.mktemp("conformance") / "data")
    yield node
    if node.proc.poll() is None:
        node.stop()


@pytest.fixture
def wire(node):
    client = Wire(node.endpoint)
    yield client
    client.sock.close()


def on_shard(shard: int, prefix: bytes) -> bytes:
    return next(k for k in (prefix + b"-%d" % i for i in range(1000)) if zlib.crc32(k) % 2 == shard)


def test_ping_over_dealer_and_req(node, wire):
    pong = wire.ok("ping")
    assert pong["version"] == 1 and pong["shards"] == 2 and isinstance(pong["ts"], int)
    req = Wire(node.endpoint, zmq.REQ)
    try:
        assert req.ok("ping")["version"] == 1
    finally:
        req.sock.close()


def test_get_txn_delete_versions_and_strictly_increasing_commit_ts(wire):
    a, b = on_shard(0, b"gt-a"), on_shard(1, b"gt-b")
    first = wire.ok("txn", writes=[[a, b"1"], [b, "two"]])["commit_ts"]     # str read as UTF-8
    got = wire.ok("get", keys=[a, b, b"gt-never"])
    assert got["values"] == [b"1", b"two", None]
    assert got["versions"] == [first, first, 0] and got["ts"] >= first
    second = wire.ok("txn", reads=[[a, first]], writes=[[a, None]])["commit_ts"]
    assert second > first
    assert wire.ok("get", keys=[a])["versions"] == [0], "a deleted key reads as absent"
    old = wire.ok("get", keys=[a], at=first)
    assert old["values"] == [b"1"] and old["ts"] == first, "a snapshot read sees the past"
    check = wire.ok("txn", reads=[[b, first]], writes=[])
    assert check["commit_ts"] >= second, "validate-only txn answers with the snapshot ts"


def test_conflict_lists_keys_and_writes_nothing(wire):
    a, b = on_shard(0, b"cf-a"), on_shard(1, b"cf-b")
    ts = wire.ok("txn", writes=[[a, b"x"], [b, b"y"]])["commit_ts"]
    wire.ok("txn", writes=[[a, b"moved"]])
    error = wire.error("txn", "conflict", reads=[[a, ts], [b, ts]], writes=[[a, b"1"], [b, b"2"]])
    assert error["retryable"] is True and a in error["keys"] and b not in error["keys"]
    assert wire.ok("get", keys=[a, b])["values"] == [b"moved", b"y"], "nothing of it was written"


def test_batch_applies_in_list_order(wire):
    k = on_shard(1, b"batch")
    results = wire.ok("batch", txns=[{"writes": [[k, b"first"]]},
                                     {"reads": [[k, 0]], "writes": [[k, b"second"]]},
                                     {"writes": [[k, b"third"]]}])["results"]
    assert [r["ok"] for r in results] == [True, False, True], "entry 2 saw entry 1's write"
    assert results[1]["error"]["code"] == "conflict"
    assert results[0]["commit_ts"] < results[2]["commit_ts"]
    assert wire.ok("get", keys=[k])["values"] == [b"third"]


def test_scan_merges_shards_in_order_with_prefix_range_limit_and_snapshot(wire):
    keys = [b"scan/%02d" % i for i in range(12)]
    ts = wire.ok("batch", txns=[{"writes": [[k, k[-2:]]]} for k in keys])["results"][-1]["commit_ts"]
    page = wire.ok("scan", prefix=b"scan/", limit=5)
    assert [item[0] for item in page["items"]] == keys[:5] and page["more"] is True
    rest = wire.ok("scan", start=keys[5], end=b"scan0", at=page["ts"])
    assert [item[0] for item in rest["items"]] == keys[5:] and rest["more"] is False
    assert all(item[2] <= ts for item in rest["items"])
    wire.ok("txn", writes=[[keys[0], None]])
    assert wire.ok("scan", prefix=b"scan/", limit=1)["items"][0][0] == keys[1], "only live keys"
    assert wire.ok("scan", prefix=b"scan/", at=ts)["items"][0][0] == keys[0]


def test_block_flush_prune_too_old(wire):
    height = wire.ok("block", height=10)
    assert height["height"] == 10 and isinstance(height["flushed"], bool)
    wire.error("block", "bad_request", height=10)
    k = on_shard(0, b"prune")
    first = wire.ok("txn", writes=[[k, b"v1"]])["commit_ts"]
    for i in range(2, 6):
        wire.ok("txn", writes=[[k, b"v%d" % i]])
    flushed = wire.ok("flush")
    assert flushed["flush_ts"] > first and flushed["keys"] >= 1 and flushed["bytes"] > 0
    assert wire.ok("prune", keep_versions=2)["versions_removed"] >= 3
    wire.error("get", "too_old", keys=[k], at=first)
    assert wire.ok("get", keys=[k])["values"] == [b"v5"]


def test_checkpoints_create_list_delete_and_not_found(wire):
    created = wire.ok("checkpoint", action="create", name="conf-1")
    assert created["name"] == "conf-1" and created["ts"] > 0
    assert isinstance(created["block"], int) and isinstance(created["created_at"], float)
    listed = {c["name"]: c for c in wire.ok("checkpoint", action="list")["checkpoints"]}
    assert listed["conf-1"]["ts"] == created["ts"] and listed["conf-1"]["bytes"] > 0
    wire.ok("checkpoint", action="delete", name="conf-1")
    assert "conf-1" not in {c["name"] for c in wire.ok("checkpoint", action="list")["checkpoints"]}
    wire.error("checkpoint", "not_found", action="delete", name="conf-1")
    for bad in ("../escape", "a/b", "", ".hidden"):
        wire.error("checkpoint", "bad_request", action="create", name=bad)


def test_bad_requests_and_limits_change_nothing(wire):
    wire.send_raw(b"\xc1 not msgpack")
    reply = wire.recv()
    assert reply["id"] is None and reply["error"]["code"] == "bad_request"
    wire.error("frobnicate", "bad_request")
    wire.error("get", "bad_request")                                  # missing keys
    wire.error("get", "bad_request", keys=[b""])                      # empty key
    wire.error("txn", "bad_request", writes=[[b"k", 5]])              # mistyped value
    wire.error("get", "too_large", keys=[b"k" * 10_001])
    wire.error("txn", "too_large", writes=[[b"big", b"v" * 100_001]])
    wire.error("txn", "too_large", writes=[[b"w%d" % i, b""] for i in range(10_001)])
    wire.next_id += 1
    wire.send_raw(msgpack.packb({"op": "txn", "id": wire.next_id,
                                 "writes": [[b"huge", b"v" * (17 << 20)]]}))
    assert wire.recv(30)["error"]["code"] == "too_large", "a 17 MiB frame is over 16 MiB"
    assert wire.ok("get", keys=[b"big", b"w0", b"huge"])["versions"] == [0, 0, 0]


def test_writes_without_reads_never_conflict(wire):
    """`conflict` is "a read's version no longer matches": a txn with no reads commits,
    also when it meets keys a pipelined cross-shard txn is committing (found by an audit:
    such a blind write used to meet the shard's prepare lock and get `conflict`)."""
    a0, a1 = on_shard(0, b"blind"), on_shard(1, b"blind")
    for i in range(30):
        wire.send_raw(msgpack.packb({"op": "txn", "id": f"x{i}", "writes": [[a0, b"x%d" % i], [a1, b"x%d" % i]]}))
        wire.send_raw(msgpack.packb({"op": "txn", "id": f"y{i}", "writes": [[a0, b"y%d" % i]]}))
        wire.send_raw(msgpack.packb({"op": "batch", "id": f"z{i}", "txns": [{"writes": [[a1, b"z%d" % i]]}]}))
    replies = {}
    for _ in range(90):
        reply = wire.recv()
        replies[reply["id"]] = reply
    failed = [r for r in replies.values() if not r["ok"] or not all(e["ok"] for e in r.get("results", []))]
    assert not failed, f"{len(failed)} of 90 blind writes failed, e.g. {failed[0]}"
    ts = {i: r.get("commit_ts") or r["results"][0]["commit_ts"] for i, r in replies.items()}
    last_a0 = max((i for i in ts if i[0] in "xy"), key=ts.get)
    last_a1 = max((i for i in ts if i[0] in "xz"), key=ts.get)
    got = wire.ok("get", keys=[a0, a1])["values"]
    assert got == [last_a0[0].encode() + last_a0[1:].encode(), last_a1[0].encode() + last_a1[1:].encode()], \
        "each key holds the write with the highest commit_ts"


def test_pipelined_requests_are_paired_by_id(wire):
    for i in range(200):
        wire.send_raw(msgpack.packb({"op": "txn", "id": f"p{i}", "writes": [[b"pipe-%d" % i, b"%d" % i]]}))
    replies = {}
    for _ in range(200):
        reply = wire.recv()
        replies[reply["id"]] = reply
    assert sorted(replies) == sorted(f"p{i}" for i in range(200))
    assert all(r["ok"] for r in replies.values())


def test_a_dealer_may_pipeline_any_number_of_requests_before_reading(node):
    """Every reply comes, however many requests went before the first read: the router's
    reply queue had a high-water mark of 100,000, past which ZeroMQ dropped replies. The
    client's own queue and socket buffer are kept small, so that the replies wait in the
    router; 100-byte ids make them big enough that the kernel's buffers hold few."""
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.setsockopt(zmq.RCVHWM, 10)
    client.setsockopt(zmq.RCVBUF, 4096)
    client.connect(node.endpoint)
    count = 250_000
    try:
        for i in range(count):
            client.send(msgpack.packb({"op": "ping", "id": b"%0100d" % i}))
        got = 0
        while got < count and client.poll(15_000):
            reply = msgpack.unpackb(client.recv(), raw=False)
            assert reply["ok"] and reply["id"] == b"%0100d" % got, "in order, none lost"
            got += 1
    finally:
        client.close()
    assert got == count


def test_stats_names_the_processes(node, wire):
    stats = wire.ok("stats")
    assert stats["node"]["supervisor_pid"] == node.proc.pid
    assert stats["node"]["router_pid"] > 0
    shards = stats["shards"]
    assert [s["shard"] for s in shards] == [0, 1]
    for s in shards:
        assert s["up"] is True and s["pid"] > 0
        for field in ("keys", "versions", "txn_committed", "txn_conflict", "tps",
                      "latency_p50_ms", "latency_p90_ms", "latency_p99_ms"):
            assert field in s, field
        assert set(s["flush"]) >= {"flush_count", "keys_flushed", "bytes_flushed",
                                   "last_flush_ts", "last_flush_block"}


def test_a_killed_shard_answers_unavailable_then_comes_back(wire):
    victim = wire.ok("stats")["shards"][1]["pid"]
    k = on_shard(1, b"unavail")
    os.kill(victim, signal.SIGKILL)
    seen, deadline = None, time.monotonic() + 20
    while time.monotonic() < deadline:
        reply = wire.call("txn", writes=[[k, b"v"]])
        if not reply["ok"]:
            seen = reply["error"]
            break
    assert seen is not None, "the restart window was never observed"
    assert seen["code"] == "unavailable" and seen["retryable"] is True
    assert seen.get("outcome") in ("aborted", "unknown")
    deadline = time.monotonic() + 30
    while not wire.call("txn", writes=[[k, b"back"]])["ok"]:
        assert time.monotonic() < deadline, "the shard never came back"
        time.sleep(0.05)   # retry pacing while the supervisor restarts the shard
    assert wire.ok("stats")["shards"][1]["pid"] != victim


def test_graceful_stop_then_restart_keeps_data_and_ts_increasing(node, wire, tmp_path_factory):
    k = on_shard(0, b"durable")
    ts = wire.ok("txn", writes=[[k, b"kept"]])["commit_ts"]
    data_dir = Path(node.proc.args[node.proc.args.index("--data-dir") + 1])
    assert node.stop() == 0
    again = Node(data_dir)
    try:
        client = Wire(again.endpoint)
        got = client.ok("get", keys=[k])
        assert got["values"] == [b"kept"] and got["versions"] == [ts]
        assert client.ok("txn", writes=[[k, b"new"]])["commit_ts"] > ts
        client.sock.close()
    finally:
        assert again.stop() == 0
