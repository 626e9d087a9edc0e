"""End to end: a real node (scripts/node) under bounded load, scraped by a real Prometheus
(scripts/monitor). Every Grafana dashboard query returns series; a SIGKILLed shard shows
shardkv_shard_up 0 while /metrics keeps answering, then 1 with one more restart, and no
counter goes backwards."""
import os
import signal
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.prom import PROMETHEUS, ROOT, dashboard_queries, monitor, query, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(PROMETHEUS is None and os.environ.get("CI") != "true",
                       reason="prometheus missing (scripts/test installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """scripts/node in a temp data dir on free ports; stopped with SIGTERM."""

    def __init__(self, data_dir: Path, shards: int = 2):
        self.port, self.metrics_port = free_port(), free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "node"), "--data-dir", str(data_dir), "--shards", str(shards),
             "--listen", self.endpoint, "--metrics-port", str(self.metrics_port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stdout.extend(self.proc.stdout), daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def wait_ready(self, timeout=60):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("node exited: " + "".join(self.stderr[-30:]))
            return any("ready" in line for line in self.stdout)
        wait_for(ready, timeout, "the node's ready line")

    def metrics(self) -> dict:
        """{(name, frozenset(labels)): value} of one /metrics scrape (2 s timeout)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


class Client:
    """A bare DEALER speaking protocol v1 (one msgpack map per frame)."""

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 0
        self.block = 0          # block heights must keep increasing across load rounds

    def call(self, op, **fields):
        self.next_id += 1
        self.sock.send(msgpack.packb({"op": op, "id": self.next_id, **fields}, use_bin_type=True))
        if not self.sock.poll(10_000):
            raise TimeoutError(f"no reply to {op}")
        reply = msgpack.unpackb(self.sock.recv(), raw=False)
        assert reply["id"] == self.next_id, reply
        return reply

    def close(self):
        self.sock.close()


def drive_load(client: Client, rounds: int = 60) -> dict:
    """Bounded mixed load: single- and cross-shard txns, conflicts, gets, scans, batches,
    blocks, a flush and a prune. Returns counts of what happened."""
    seen = {"committed": 0, "conflict": 0}
    versions = {}
    for i in range(rounds):
        keys = [f"k{(i * 7 + j) % 40:03d}".encode() for j in range(4)]   # 4 keys: spans both shards
        r = client.call("txn", writes=[[k, f"v{i}".encode()] for k in keys])
        assert r["ok"], r
        seen["committed"] += 1
        for k in keys:
            versions[k] = r["commit_ts"]
        # single-shard txn reading a version that is now stale -> conflict
        r = client.call("txn", reads=[[keys[0], max(1, versions[keys[0]] - 1)]], writes=[[keys[0], b"x"]])
        seen["conflict" if not r["ok"] else "committed"] += 1
        got = client.call("get", keys=keys[:2])
        assert got["ok"], got
        if i % 10 == 0:
            assert client.call("scan", prefix=b"k", limit=50)["ok"]
            assert client.call("batch", txns=[{"writes": [[b"b%d" % i, b"1"]]},
                                              {"writes": [[b"c%d" % i, b"2"]]}])["ok"]
            client.block += 1
            assert client.call("block", height=client.block)["ok"]
        if i == rounds // 2:
            assert client.call("flush")["ok"]
    assert client.call("prune", keep_versions=1)["ok"]
    assert client.call("flush")["ok"]
    assert seen["conflict"] > 0
    return seen


def value(metrics: dict, name: str, **labels) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


def shard_pid(node: Node, client: Client, shard: int) -> int:
    stats = client.call("stats")
    for entry in stats.get("shards", []):
        if entry.get("shard") == shard and entry.get("pid"):
            return entry["pid"]
    for child in psutil.Process(node.proc.pid).children(recursive=True):   # fallback: the spawn spec
        cmd = " ".join(child.cmdline())
        if "shard.worker" in cmd and (f'"shard": {shard}' in cmd or f'"shard_id": {shard}' in cmd):
            return child.pid
    raise AssertionError(f"no pid for shard {shard}: {stats}")


def test_dashboard_queries_and_shard_kill_against_real_prometheus(tmp_path):
    node = Node(tmp_path / "data")
    ctx = zmq.Context()
    client = None
    try:
        node.wait_ready()
        client = Client(ctx, node.endpoint)
        with monitor(node.metrics_port, scrape_interval="1s") as prom:
            drive_load(client)
            # Prometheus has scraped the load: flushes, prunes and conflicts are visible
            wait_for(lambda: query(prom, "sum(shardkv_pruned_versions_total) > 0")
                     and query(prom, "sum(shardkv_flush_total) > 0")
                     and query(prom, 'sum(shardkv_txn_total{result="conflict"}) > 0')
                     and query(prom, "count_over_time(shardkv_commit_ts[15s]) >= 3"),
                     30, "Prometheus to scrape the load")
            drive_load(client, rounds=10)          # keep rates non-zero while querying
            empty = [(title, expr) for shard in (".*", "1") for title, expr in dashboard_queries("15s", shard)
                     if not query(prom, expr)]
            assert not empty, f"dashboard queries without data: {empty}"

            # SIGKILL shard 0: up goes 0 (served from cache, /metrics keeps answering), then 1
            before = node.metrics()
            restarts = value(before, "shardkv_shard_restarts_total", shard="0")
            committed = value(before, "shardkv_txn_total", shard="0", result="committed")
            os.kill(shard_pid(node, client, 0), signal.SIGKILL)
            wait_for(lambda: value(node.metrics(), "shardkv_shard_up", shard="0") == 0, 10,
                     "shardkv_shard_up{shard=0} to drop to 0", interval=0.01)
            assert value(node.metrics(), "shardkv_keys", shard="0") is not None   # last snapshot kept
            after = wait_for(lambda: (m := node.metrics()) and value(m, "shardkv_shard_up", shard="0") == 1 and m,
                             30, "shard 0 to come back")
            assert value(after, "shardkv_shard_restarts_total", shard="0") == restarts + 1
            wait_for(lambda: client.call("txn", writes=[[b"after", b"1"]])["ok"], 15, "writes after restart")
            later = wait_for(lambda: (m := node.metrics()) and
                             value(m, "shardkv_txn_total", shard="0", result="committed") is not None and m,
                             10, "shard 0 snapshot after restart")
            assert value(later, "shardkv_txn_total", shard="0", result="committed") >= committed
            wait_for(lambda: query(prom, f'shardkv_shard_restarts_total{{shard="0"}} >= {restarts + 1}'),
                     15, "Prometheus to see the restart")
        client.close()
        client = None
        assert node.stop() == 0, "".join(node.stderr[-30:])
    finally:
        if client is not None:
            client.close()
        node.stop()
        ctx.term()
