"""Real processes for the node benchmark and the soak: a shardkv node and a Redis 7 peer,
plus a lean pipelining protocol-v1 connection (DEALER + msgpack, no client-library
overhead, so the client measures the server rather than itself)."""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import msgpack
import zmq

from benchlib import ROOT, free_port
# preexec_fn of every process started here: SIGTERM (a graceful stop) when the thread that
# started it dies, so a benchmark or soak that is SIGKILLed (a test's cleanup after a
# failure) leaves no node, echo server or Redis running: seven nodes were once found up an
# hour after failed soak tests. Start these from a thread that outlives them (the main one).
from shard.process import set_parent_death_signal as die_with_parent  # noqa: E402


def cpu_seconds(proc) -> float:
    """User + system CPU of a psutil.Process (every thread), 0.0 once it is gone."""
    import psutil
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


class CpuMeter:
    """CPU seconds each named process used inside the `with` block: where the work of a
    run went (router, shards, client, Redis), which wall-clock throughput alone hides."""

    def __init__(self, procs: dict):
        self.procs = procs          # name -> psutil.Process
        self.used: dict[str, float] = {}

    def __enter__(self):
        self.start = {name: cpu_seconds(p) for name, p in self.procs.items()}
        return self

    def __exit__(self, *exc) -> None:
        self.used = {name: cpu_seconds(p) - self.start[name] for name, p in self.procs.items()}


def node_roles(supervisor_pid: int) -> dict:
    """{"supervisor", "router", "shard-<i>"} -> psutil.Process for a running node."""
    import json
    import psutil
    sup = psutil.Process(supervisor_pid)
    roles = {"supervisor": sup}
    for child in sup.children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "node.router" in argv:
            roles["router"] = child
        elif "shard.worker" in argv and "--spec" in argv:
            spec = json.loads(argv[argv.index("--spec") + 1])
            roles[f"shard-{spec['shard']}"] = child
    return roles


class NodeProcess:
    """`python -m supervisor.main` (what scripts/node runs) on free ports and a tmp data dir."""

    def __init__(self, data_dir: Path, shards: int, config: Path | None = None, boot_timeout: float = 60.0):
        self.data_dir = Path(data_dir)
        self.shards = shards
        self.port = free_port()
        self.metrics_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "supervisor.main", "--data-dir", str(self.data_dir),
                "--shards", str(shards), "--listen", self.endpoint, "--metrics-port", str(self.metrics_port)]
        if config:
            args += ["--config", str(config)]
        self.log_path = self.data_dir.parent / f"node-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     preexec_fn=die_with_parent)
        self._lines: deque[str] = deque(maxlen=200)
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        if not ready.wait(boot_timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"node did not print 'ready' within {boot_timeout}s; "
                               f"last output: {list(self._lines)[-5:]} (log: {self.log_path})")

    def _pump(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            self._lines.append(line.rstrip())
            self._log.write(line)
            self._log.flush()
            if "ready" in line:
                ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


ECHO_SERVER = """
import sys, time, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.setsockopt(zmq.LINGER, 0)
sock.bind(sys.argv[1])
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:        # bounded in time; the bench stops it earlier
    if sock.poll(200):
        sock.send_multipart(sock.recv_multipart())
"""


class EchoProcess:
    """The transport floor of a node round trip: a Python process whose ZeroMQ ROUTER
    sends every frame straight back (no decoding, no work), on a free loopback port."""

    def __init__(self, max_seconds: float = 600.0):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, self.endpoint, str(max_seconds)],
                                     stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError("echo server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class RedisProcess:
    """redis-server with AOF `appendfsync everysec`, no RDB snapshots, on a free port."""

    BINARY = "/usr/bin/redis-server"

    def __init__(self, work_dir: Path):
        binary = self.BINARY if os.path.exists(self.BINARY) else shutil.which("redis-server")
        if not binary:
            raise FileNotFoundError("redis-server is not installed (Debian package redis-server)")
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
             "--protected-mode", "yes", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        import redis
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not answer PING")
                time.sleep(0.05)
        info = self.client.info("server")
        self.version = info.get("redis_version")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Conn:
    """One DEALER socket speaking protocol v1; send() returns an id, recv() any reply."""

    def __init__(self, endpoint: str, timeout: float = 10.0):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout_ms = int(timeout * 1000)
        self._ids = itertools.count(1)
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def send(self, op: str, **fields) -> int:
        rid = next(self._ids)
        fields["op"] = op
        fields["id"] = rid
        self.sock.send(self._pack(fields), copy=False)
        return rid

    def recv_raw(self):
        if not self.sock.poll(self.timeout_ms):
            raise TimeoutError(f"no reply within {self.timeout_ms} ms")
        return self.sock.recv(copy=False)

    def recv(self) -> dict:
        return msgpack.unpackb(self.recv_raw(), raw=False)

    def call(self, op: str, **fields) -> dict:
        rid = self.send(op, **fields)
        while True:
            reply = self.recv()
            if reply.get("id") == rid:
                return reply

    def close(self) -> None:
        self.sock.close(0)
