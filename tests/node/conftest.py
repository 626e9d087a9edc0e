"""A shard-worker-per-shard + router cluster in real processes, without the supervisor.

The fixture binds the supervisor's PULL socket itself, so it sees the children's
`ready` / `fatal` / `stats` messages and waits on those events instead of sleeping.
"""
import copy
import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import msgpack
import pytest
import zmq

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config() -> dict:
    config = tomllib.loads((ROOT / "configs" / "node.toml").read_text())
    config["router"].update(request_timeout_secs=3.0, read_wait_secs=1.0,
                            ping_interval_secs=0.1, shard_timeout_secs=1.5)
    config["supervisor"]["stats_interval_secs"] = 0.2
    config["prune"]["auto_interval_secs"] = 0
    return config


class Client:
    """Minimal protocol client for tests: DEALER (or REQ), msgpack frames, ids."""

    def __init__(self, endpoint: str, kind=zmq.DEALER):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)

    def send(self, op: str, **fields):
        rid = next(self.ids)
        self.sock.send(msgpack.packb({"op": op, "id": rid, **fields}, use_bin_type=True))
        return rid

    def recv(self, timeout=10.0) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def call(self, op: str, timeout=10.0, **fields) -> dict:
        rid = self.send(op, **fields)
        while True:
            reply = self.recv(timeout)
            if reply.get("id") == rid:
                return reply

    def many(self, requests, timeout=20.0) -> list:
        """Pipeline [(op, fields)], return replies in request order."""
        ids = [self.send(op, **fields) for op, fields in requests]
        got = {}
        while len(got) < len(ids):
            reply = self.recv(timeout)
            got[reply["id"]] = reply
        return [got[i] for i in ids]

    def ok(self, op: str, **fields) -> dict:
        reply = self.call(op, **fields)
        assert reply["ok"], reply
        return reply

    def close(self):
        self.sock.close()


class Cluster:
    def __init__(self, shards: int, config: dict):
        self.shards = shards
        self.config = config
        self.data_dir = tempfile.mkdtemp(prefix="skv-data-")
        self.run_dir = tempfile.mkdtemp(prefix="skv-")   # short: ipc paths are length-limited
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.config["node"]["listen"] = self.endpoint
        self.ctx = zmq.Context.instance()
        self.status = self.ctx.socket(zmq.PULL)
        self.status.setsockopt(zmq.LINGER, 0)
        self.status.bind(f"ipc://{self.run_dir}/supervisor.sock")
        self.procs = {}          # "router" | shard index -> Popen
        self.events = []         # status messages received
        self.clients = []

    def spec(self, role: str, shard=None) -> str:
        spec = {"role": role, "shards": self.shards, "data_dir": self.data_dir,
                "run_dir": self.run_dir, "config": self.config}
        if shard is not None:
            spec["shard"] = shard
        return json.dumps(spec)

    def spawn(self, role: str, shard=None) -> subprocess.Popen:
        module = "shard.worker" if role == "shard" else "node.router"
        proc = subprocess.Popen([sys.executable, "-m", module, "--spec", self.spec(role, shard)],
                                cwd=ROOT)
        self.procs["router" if role == "router" else shard] = proc
        return proc

    def pump(self, timeout=0.05):
        if self.status.poll(int(timeout * 1000)):
            while True:
                try:
                    self.events.append(msgpack.unpackb(self.status.recv(zmq.NOBLOCK), raw=False,
                                                       strict_map_key=False))
                except zmq.Again:
                    break

    def wait_event(self, pred, timeout=20.0, since=0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events[since:]:
                if pred(ev):
                    return ev
            self.pump()
        raise TimeoutError("status event not seen")

    def start_shard(self, i: int, wait=True):
        mark = len(self.events)
        proc = self.spawn("shard", i)
        if wait:
            self.wait_event(lambda e: e.get("kind") == "ready" and e.get("shard") == i
                            and e.get("pid") == proc.pid, since=mark)
        return proc

    def start_router(self, wait=True):
        mark = len(self.events)
        proc = self.spawn("router")
        if wait:
            self.wait_event(lambda e: e.get("kind") == "ready" and e.get("role") == "router"
                            and e.get("pid") == proc.pid, since=mark)
        return proc

    def start(self):
        for i in range(self.shards):
            self.start_shard(i, wait=False)
        self.start_router()
        return self

    def kill(self, which):
        proc = self.procs[which]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_all_shards_up(self, timeout=20.0):
        """Poll the router's ping until every shard answers through it (after a restart)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = client.call("get", keys=[f"probe-{i}".encode() for i in range(16)])
            if reply["ok"]:
                return
            time.sleep(0.05)
        raise TimeoutError("shards did not come back")

    def client(self, kind=zmq.DEALER) -> Client:
        c = Client(self.endpoint, kind)
        self.clients.append(c)
        return c

    def stop(self):
        for c in self.clients:
            c.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.status.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def make_cluster():
    made = []

    def make(shards=2, **overrides) -> Cluster:
        config = copy.deepcopy(base_config())
        for section, values in overrides.items():
            config[section].update(values)
        cluster = Cluster(shards, config)
        made.append(cluster)
        return cluster.start()
    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
def cluster(make_cluster) -> Cluster:
    return make_cluster(2)


@pytest.fixture
def inproc_router(tmp_path):
    """A Router in this process with two shard links marked up and no shard processes:
    a test reads its shard messages from the links' outboxes and answers them by hand
    (Router.complete), so every interleaving it drives is exact."""
    from node.router import Router, ShardLink
    r = Router({"config": {}, "shards": 2, "data_dir": str(tmp_path), "run_dir": str(tmp_path)})
    r.oracle.start(0)
    for i in range(2):
        link = ShardLink(i, str(tmp_path / f"shard-{i}.sock"))
        link.state, link.inc = "up", f"inc-{i}"
        r.links.append(link)
    return r
