"""A real node (scripts/node, 2 shards) whose data dir is on a small tmpfs (skipped where
mounting one is not permitted), written to until its disk is full, with flushes,
checkpoints, blocks, auto-flush and auto-prune on the way; then a filler file in the same
tmpfs is deleted. What every request answers, what the processes do while the disk is
full, and that every acknowledged transaction is there afterwards (and none of those
answered `aborted`: each txn writes keys of its own).

- The free-space guard ([durability] min_free_bytes): writes are refused `unavailable`,
  reads served, no restart, no CPU burnt; writes resume once space is freed.
- Without it (min_free_bytes = 0) the write fails in RocksDB: the shard answers what it
  held `unavailable` and restarts once, read-only (its disk too full to open the
  database for writing), serves reads, and reopens for writing once space is freed.
"""
import os
import signal
import time

import msgpack
import psutil
import pytest
import zmq

from node.router import shard_of
from supervisor_harness import NodeProcess, free_port, http_get, metric, wait_for, write_config
from tests.tmpfs import fill, free_bytes

pytestmark = pytest.mark.e2e

VALUE = os.urandom(4000)
MAX_TXNS = 4000            # bounds the write loop (the disk fills after about 1,000)


class Wire:
    """A DEALER client that pairs replies by id."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 0

    def call(self, op: str, timeout: float = 10.0, **fields) -> dict:
        self.next_id += 1
        self.sock.send(msgpack.packb({"op": op, "id": self.next_id, **fields}))
        deadline = time.monotonic() + timeout
        while True:
            assert self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"no reply to {op}"
            reply = msgpack.unpackb(self.sock.recv(), raw=False)
            if reply.get("id") == self.next_id:
                return reply

    def close(self):
        self.sock.close()


def start_node(tmp_path, disk, min_free: int) -> tuple[NodeProcess, str, int]:
    listen, metrics_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    config = write_config(
        tmp_path / "node.toml",
        durability={"min_free_bytes": min_free},
        flush={"interval_secs": 1, "blocks_per_flush": 5},
        prune={"auto_interval_secs": 1, "keep_versions": 1},
        rocksdb={"write_buffer_bytes": 1 << 20, "block_cache_bytes": 4 << 20},
        router={"request_timeout_secs": 3.0, "ping_interval_secs": 0.1, "shard_timeout_secs": 1.0},
        supervisor={"stats_interval_secs": 0.2, "restart_backoff_initial_secs": 0.2})
    node = NodeProcess(tmp_path, "--config", str(config), "--data-dir", str(disk / "data"),
                       "--shards", "2", "--listen", listen, "--metrics-port", str(metrics_port))
    node.wait_ready()
    return node, listen, metrics_port


class Ledger:
    """What the node answered: acknowledged txns, and those whose outcome it reported."""

    def __init__(self):
        self.acked = {}        # key -> (value, commit_ts)
        self.aborted = []      # keys of txns answered unavailable/aborted
        self.unknown = []      # (keys, value) of txns answered unavailable/unknown
        self.errors = []       # (op, error) of every refusal

    def txn(self, wire: Wire, i: int) -> dict:
        keys = [f"t{i}a".encode(), f"t{i}b".encode()]     # each txn its own keys
        value = b"%d:" % i + VALUE
        reply = wire.call("txn", writes=[[k, value] for k in keys])
        if reply["ok"]:
            for k in keys:
                self.acked[k] = (value, reply["commit_ts"])
            return reply
        error = reply["error"]
        self.errors.append(("txn", error))
        assert error["code"] == "unavailable" and error["retryable"], error
        assert error.get("outcome") in ("aborted", "unknown"), error
        (self.aborted if error["outcome"] == "aborted" else self.unknown).append((keys, value))
        return reply

    def fill_disk(self, wire: Wire) -> int:
        """Write (with blocks, flushes and checkpoints on the way) until 20 txns in a row
        are refused; returns the txns sent."""
        refused_in_row, height = 0, 0
        for i in range(1, MAX_TXNS + 1):
            refused_in_row = 0 if self.txn(wire, i)["ok"] else refused_in_row + 1
            if refused_in_row >= 20:
                return i
            if i % 10 == 0:
                height += 1
                self.other(wire, "block", height=height)
            if i % 100 == 0:
                self.other(wire, "flush")
                self.other(wire, "checkpoint", action="create")
        raise AssertionError(f"the disk did not fill within {MAX_TXNS} txns")

    def other(self, wire: Wire, op: str, **fields) -> None:
        reply = wire.call(op, **fields)
        if not reply["ok"]:
            assert reply["error"]["code"] == "unavailable" and reply["error"]["retryable"], reply
            self.errors.append((op, reply["error"]))

    def check(self, wire: Wire) -> None:
        """Every acknowledged txn is there; a txn answered aborted is not; one whose
        outcome was unknown is there whole or not at all."""
        keys = list(self.acked)
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            reply = wire.call("get", keys=part)
            assert reply["ok"], reply
            got = list(zip(reply["values"], reply["versions"]))
            assert got == [self.acked[k] for k in part]
        for keys, value in self.aborted:
            reply = wire.call("get", keys=keys)
            assert reply["ok"] and reply["versions"] == [0, 0], (keys, reply)
        for keys, value in self.unknown:
            reply = wire.call("get", keys=keys)
            assert reply["ok"] and reply["values"] in ([None, None], [value, value]), (keys, reply)


def cpu_seconds(node: NodeProcess) -> float:
    total = 0.0
    for proc in [psutil.Process(node.pid), *node.children()]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def wait_committed(wire: Wire, timeout: float = 20.0) -> dict:
    def committed():
        reply = wire.call("txn", writes=[[b"after", b"x"]])
        return reply if reply["ok"] else None
    return wait_for(committed, timeout, "a txn to commit once space was freed", interval=0.2)


def test_below_min_free_the_node_refuses_writes_serves_reads_and_resumes(tmp_path, tmpfs):
    disk = tmpfs(24)
    (disk / "filler").write_bytes(b"\0" * (6 << 20))
    node, listen, metrics_port = start_node(tmp_path, disk, min_free=4 << 20)
    wire = Wire(listen)
    try:
        ledger = Ledger()
        ledger.fill_disk(wire)
        assert len(ledger.acked) > 500
        # every refusal names the cause; no txn's outcome is unknown
        for op, error in ledger.errors:
            assert "disk nearly full" in error["message"] and "min_free_bytes" in error["message"], (op, error)
        assert ledger.unknown == []
        # reads are served; writes of every kind are refused, with the cause
        some = list(ledger.acked)[:4]
        reply = wire.call("get", keys=some)
        assert reply["ok"] and reply["values"] == [ledger.acked[k][0] for k in some]
        assert wire.call("scan", prefix=b"t1", limit=5)["ok"]
        for op, fields in (("flush", {}), ("checkpoint", {"action": "create"}), ("block", {"height": 10**6}),
                           ("prune", {})):
            reply = wire.call(op, **fields)
            assert not reply["ok"] and reply["error"]["code"] == "unavailable", (op, reply)
            assert "disk nearly full" in reply["error"]["message"]
        shards = wire.call("stats")["shards"]
        assert [s["disk"]["writes"] for s in shards] == ["low_space", "low_space"]
        text = wait_for(lambda: (lambda t: t if metric(t, 'shardkv_shard_writes_refused{shard="0"}') == 1.0
                                 else None)(http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]),
                        5, "shardkv_shard_writes_refused 1 at /metrics", interval=0.1)
        assert 0 < metric(text, 'shardkv_disk_free_bytes{shard="0"}') < 5 << 20    # resumes at 5 MiB
        assert metric(text, 'shardkv_shard_restarts_total{shard="0"}') == 0.0
        assert metric(text, 'shardkv_shard_restarts_total{shard="1"}') == 0.0
        # idle while full: nothing spins (a crash loop or a busy retry would)
        before, t0 = cpu_seconds(node), time.monotonic()
        wait_for(lambda: time.monotonic() - t0 >= 2.0, 3, "two idle seconds", interval=0.1)
        assert cpu_seconds(node) - before < 0.8
        # space freed: writes resume, nothing acknowledged is missing. The checkpoints made
        # while filling go too, as README advises: they pin SST files that compaction
        # replaced, and with them held the flush and checkpoint below could take the
        # freed filler's room again, so that the stop would find the disk low once more.
        (disk / "filler").unlink()
        for checkpoint in wire.call("checkpoint", action="list")["checkpoints"]:
            assert wire.call("checkpoint", action="delete", name=checkpoint["name"])["ok"]
        wait_committed(wire)
        ledger.check(wire)
        assert wire.call("flush")["ok"] and wire.call("checkpoint", action="create")["ok"]
        node.signal(signal.SIGTERM)
        assert node.wait_exit() == 0, node.log()[-3000:]
    finally:
        wire.close()
        node.kill_all()


def test_a_failed_disk_write_restarts_the_shard_read_only_until_space_is_freed(tmp_path, tmpfs):
    disk = tmpfs(20)
    (disk / "filler").write_bytes(b"\0" * (6 << 20))
    node, listen, metrics_port = start_node(tmp_path, disk, min_free=0)     # no guard
    wire = Wire(listen)
    try:
        ledger = Ledger()
        ledger.fill_disk(wire)
        log = node.wait_log("read-only: its disk is full", count=1)
        assert "a write to its disk failed" in log and "exited with status 75" in log
        assert "cannot start" not in log and "halting" not in log
        # the txns the failing shard held were answered, aborted (a full disk: their log
        # record was never written); a few in flight when it exited may be unknown
        failed = [e for op, e in ledger.errors if "a write to its disk failed" in e["message"]]
        assert failed and all(e.get("outcome", "aborted") == "aborted" for e in failed)
        # the node stays up and serves reads: read-only shards, no restart loop
        def readable():
            reply = wire.call("get", keys=list(ledger.acked)[:50])
            return reply if reply["ok"] else None
        reply = wait_for(readable, 15, "reads to be served while the disk is full", interval=0.2)
        assert reply["versions"] == [ledger.acked[k][1] for k in list(ledger.acked)[:50]]
        # Both shards may fail their first restart's writes too (one's read-write open can
        # find the room the other's failure left, then fail again): counted when settled.
        def settled():
            shards = wire.call("stats").get("shards", [])
            states = [s.get("disk", {}).get("writes") for s in shards if s.get("up")]
            return states if len(states) == 2 and "read_only" in states else None
        states = wait_for(settled, 15, "both shards up, one at least read-only", interval=0.2)
        # a write to a read-only shard is refused, aborted, saying why
        read_only_shard = states.index("read_only")
        key = next(k for k in (b"refused-%d" % i for i in range(1000)) if shard_of(k, 2) == read_only_shard)
        reply = wire.call("txn", writes=[[key, b"x"]])
        assert not reply["ok"], reply
        assert reply["error"]["code"] == "unavailable" and reply["error"]["outcome"] == "aborted"
        assert "read-only" in reply["error"]["message"]
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
        restarts = [metric(text, f'shardkv_shard_restarts_total{{shard="{i}"}}') for i in (0, 1)]
        assert 1.0 <= max(restarts) <= 3.0 and node.proc.poll() is None     # no restart loop
        # space freed: each read-only shard reopens its database for writing (no restart)
        (disk / "filler").unlink()
        wait_committed(wire)
        node.wait_log("database reopened for writing", count=states.count("read_only"))
        wait_for(lambda: all(s["disk"]["writes"] == "ok" for s in wire.call("stats")["shards"]), 15,
                 "every shard to take writes again", interval=0.2)
        ledger.check(wire)
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
        assert [metric(text, f'shardkv_shard_restarts_total{{shard="{i}"}}') for i in (0, 1)] == restarts
        assert free_bytes(disk) > 0
    finally:
        wire.close()
        node.kill_all()
