"""The real node (shard workers + router) under the supervisor, started through scripts/node:
persistence across a graceful restart, checkpoint restore round trip, and the crash test
(bank transfers while a shard, the router, then the whole process tree are SIGKILLed)."""
import os
import random
import signal
import threading
import time

import msgpack
import pytest
import zmq

from supervisor_harness import (NodeProcess, free_port, http_get, metric, request, wait_for,
                                write_config)

pytestmark = pytest.mark.e2e


class Node:
    """A real node on a fixed data dir, listen endpoint and metrics port (restartable)."""

    def __init__(self, tmp_path, shards=2):
        self.tmp_path = tmp_path
        self.listen = f"tcp://127.0.0.1:{free_port()}"
        self.metrics_port = free_port()
        self.config = write_config(
            tmp_path / "node.toml",
            router={"request_timeout_secs": 2.0, "ping_interval_secs": 0.1,
                    "shard_timeout_secs": 1.0},
            supervisor={"stats_interval_secs": 0.2, "heartbeat_timeout_secs": 5.0,
                        "restart_backoff_initial_secs": 0.1, "shutdown_grace_secs": 10.0},
            prune={"auto_interval_secs": 0})
        self.args = ["--config", str(self.config), "--data-dir", str(tmp_path / "data"),
                     "--shards", str(shards), "--listen", self.listen,
                     "--metrics-port", str(self.metrics_port)]
        self.procs = []

    def start(self) -> NodeProcess:
        proc = NodeProcess(self.tmp_path, *self.args)
        self.procs.append(proc)
        proc.wait_ready()
        return proc

    @property
    def proc(self) -> NodeProcess:
        return self.procs[-1]

    def call(self, op, **fields):
        reply = request(self.listen, {"op": op, **fields})
        assert reply["ok"], reply
        return reply

    def stop(self):
        self.proc.signal(signal.SIGTERM)
        assert self.proc.wait_exit() == 0, self.proc.log()[-3000:]

    def metric(self, series):
        return metric(http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")[1], series)

    def kill_all(self):
        for proc in self.procs:
            proc.kill_all()


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path)
    yield node
    node.kill_all()


def test_graceful_stop_persists_data_and_stats_name_the_pids(node):
    proc = node.start()
    writes = [[b"key-%d" % i, b"value-%d" % i] for i in range(50)]
    node.call("txn", writes=writes)
    node.call("txn", writes=[[b"key-7", None]])
    stats = node.call("stats")
    assert stats["node"]["supervisor_pid"] == proc.pid
    assert stats["node"]["router_pid"] == proc.child_pid("node.router")
    assert {s["pid"] for s in stats["shards"]} == {proc.child_pid('"shard": 0'),
                                                   proc.child_pid('"shard": 1')}
    node.stop()

    node.start()
    got = node.call("get", keys=[k for k, _ in writes])
    expected = [None if k == b"key-7" else v for k, v in writes]
    assert got["values"] == expected
    node.stop()


def test_restore_round_trip(node, tmp_path):
    node.start()
    node.call("txn", writes=[[b"gone-before", b"x"]])
    node.call("txn", writes=[[b"gone-before", None]])                   # deleted before the cut
    node.call("txn", writes=[[b"a", b"a1"], [b"b", b"b1"], [b"c", b"c1"]])
    cut = node.call("checkpoint", action="create", name="cut-1")
    node.call("txn", writes=[[b"a", b"a2"], [b"b", None], [b"gone-before", b"back?"],
                             [b"new-after", b"n"]])
    assert node.call("get", keys=[b"a", b"b"])["values"] == [b"a2", None]
    node.stop()

    restore = NodeProcess(tmp_path, "restore", "cut-1", "--data-dir", str(tmp_path / "data"))
    assert restore.wait_exit() == 0, restore.log()
    assert restore.stdout_lines == [f"restored checkpoint 'cut-1' (ts {cut['ts']}, block "
                                    f"{cut['block']}, 2 shards) into {tmp_path / 'data'}"]

    node.start()
    got = node.call("get", keys=[b"a", b"b", b"c", b"gone-before", b"new-after"])
    assert got["values"] == [b"a1", b"b1", b"c1", None, None]
    assert max(got["versions"]) <= cut["ts"]
    later = node.call("txn", writes=[[b"a", b"a3"]])
    assert later["commit_ts"] > cut["ts"]            # ts never goes back after a restore
    assert [c["name"] for c in node.call("checkpoint", action="list")["checkpoints"]] == ["cut-1"]
    node.stop()


ACCOUNTS = [b"acct-%02d" % i for i in range(16)]
OPENING = 100


class BankClient(threading.Thread):
    """Transfers between random accounts; each transfer also writes its own record key, so
    afterwards every acknowledged transfer can be looked up and every balance recomputed."""

    def __init__(self, node, cid, stop):
        super().__init__(daemon=True)
        self.node, self.cid, self.stop, self.rng = node, cid, stop, random.Random(cid)
        self.acked, self.unknown, self.errors = [], [], []

    def call(self, msg):
        try:
            return request(self.node.listen, msg, timeout_ms=3000)
        except AssertionError:          # no reply (a process was killed): outcome unknown
            return None

    def run(self):
        n = 0
        while not self.stop.is_set() and n < 5000:
            a, b = self.rng.sample(ACCOUNTS, 2)
            got = self.call({"op": "get", "keys": [a, b]})
            if not got or not got["ok"]:
                time.sleep(0.02)        # the node is restarting; back off a little
                continue
            (va, vb), (ra, rb) = [int(v) for v in got["values"]], got["versions"]
            amount = self.rng.randint(1, 5)
            if va < amount:
                continue
            record = b"xfer-%d-%d" % (self.cid, n)
            n += 1
            txn = {"op": "txn", "reads": [[a, ra], [b, rb]],
                   "writes": [[a, b"%d" % (va - amount)], [b, b"%d" % (vb + amount)],
                              [record, b"%s %s %d" % (a, b, amount)]]}
            reply = self.call(txn)
            if reply and reply["ok"]:
                self.acked.append(record)
            elif reply and reply["error"]["code"] == "conflict":
                continue
            elif reply is None or reply["error"]["code"] == "unavailable":
                self.unknown.append(record)
            else:
                self.errors.append(reply)


def test_bank_transfers_survive_sigkill_of_a_shard_the_router_and_the_whole_tree(node):
    proc = node.start()
    node.call("txn", writes=[[a, b"%d" % OPENING] for a in ACCOUNTS])
    stop = threading.Event()
    clients = [BankClient(node, cid, stop) for cid in range(3)]
    for c in clients:
        c.start()
    acked = lambda: sum(len(c.acked) for c in clients)

    def progress(more, what):
        goal = acked() + more
        wait_for(lambda: acked() >= goal, 40, f"{more} more acknowledged transfers {what}")

    try:
        progress(50, "before any kill")
        shard1 = proc.child_pid('"shard": 1')
        os.kill(shard1, signal.SIGKILL)
        proc.wait_log("shard 1 ready", count=2, timeout=30)
        progress(30, "after the shard restart")
        assert node.metric('shardkv_shard_restarts_total{shard="1"}') == 1

        router = proc.child_pid("node.router")
        os.kill(router, signal.SIGKILL)
        proc.wait_log("router ready", count=2, timeout=30)
        progress(30, "after the router restart")
        log = proc.log()
        assert f"shard 1 (pid {shard1}) was killed by SIGKILL" in log
        assert f"router (pid {router}) was killed by SIGKILL" in log
        assert "restarting router in 0.1s (restart #1)" in log
        assert node.metric("shardkv_router_restarts_total") == 1
        assert node.metric('shardkv_shard_restarts_total{shard="1"}') == 1

        children = proc.kill_tree()                     # supervisor and every child at once
        assert len(children) == 3
        proc.wait_exit()
        node.start()
        progress(30, "after the whole tree was killed and started again")
    finally:
        stop.set()
        for c in clients:
            c.join(10)
    assert not any(c.errors for c in clients), [c.errors for c in clients]
    print(f"transfers: {acked()} acknowledged, {sum(len(c.unknown) for c in clients)} unknown")
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in children)

    balances = dict(zip(ACCOUNTS, node.call("get", keys=ACCOUNTS)["values"]))
    assert sum(int(v) for v in balances.values()) == OPENING * len(ACCOUNTS)
    acked_records = [r for c in clients for r in c.acked]
    unknown = [r for c in clients for r in c.unknown]
    got = node.call("get", keys=acked_records + unknown)["values"]
    assert all(v is not None for v in got[:len(acked_records)]), "an acknowledged transfer is lost"
    # Recompute every balance from the transfers that exist: no transfer is half applied.
    expected = {a: OPENING for a in ACCOUNTS}
    for record in got:
        if record is not None:
            a, b, amount = record.split()
            expected[a] -= int(amount)
            expected[b] += int(amount)
    assert {a: int(v) for a, v in balances.items()} == expected
    node.stop()


def test_a_shard_that_cannot_open_its_data_halts_the_node(node, tmp_path):
    node.start()
    node.stop()
    data = tmp_path / "data"
    os.rename(data / "shard-1", tmp_path / "moved")
    (data / "shard-1").write_text("not a database")
    halted = NodeProcess(tmp_path, *node.args)
    node.procs.append(halted)
    assert halted.wait_exit(timeout=60) == 1
    log = halted.log()
    # The worker's `fatal` message reaches the supervisor (it is flushed before the worker
    # exits), and the supervisor halts with its reason.
    assert "halting: shard 1 cannot start: shard 1: " in log and "File exists" in log
    assert "restarting" not in log
    assert halted.stdout_lines == [] and halted.children() == []


def test_sigterm_finishes_in_flight_requests_before_exiting(node):
    proc = node.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(node.listen)
    try:
        for i in range(200):                              # pipelined: all in flight at once
            sock.send(msgpack.packb({"op": "txn", "id": i,
                                     "writes": [[b"inflight-%d" % i, b"v%d" % i]]}))
        assert sock.poll(10000), "no reply at all"
        replies = [msgpack.unpackb(sock.recv(), raw=False)]   # the router is working on them
        proc.signal(signal.SIGTERM)
        while len(replies) < 200 and sock.poll(10000):
            replies.append(msgpack.unpackb(sock.recv(), raw=False))
    finally:
        sock.close()
    assert proc.wait_exit(timeout=60) == 0, proc.log()[-3000:]
    acked = [r["id"] for r in replies if r["ok"]]
    print(f"{len(replies)} replies to 200 in-flight txns, {len(acked)} ok")
    assert len(replies) == 200, f"{200 - len(replies)} in-flight requests got no reply; " \
        f"errors: {[r for r in replies if not r['ok']][:3]}\n{proc.log()[-3000:]}"
    node.start()
    got = node.call("get", keys=[b"inflight-%d" % i for i in acked])["values"]
    assert got == [b"v%d" % i for i in acked]
    node.stop()
