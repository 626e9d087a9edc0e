"""Start `scripts/node` as a real process and watch it: ready line, log, children, exit.

Every wait polls a condition against a deadline; nothing sleeps for synchronisation.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import psutil
import zmq

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def fake_env(**misbehaviour) -> dict:
    """Environment that makes the supervisor spawn tests/supervisor/fake_child.py."""
    env = dict(os.environ, SHARDKV_SHARD_MODULE="fake_child", SHARDKV_ROUTER_MODULE="fake_child",
               PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.update({k: str(v) for k, v in misbehaviour.items()})
    return env


def write_config(path: Path, **sections) -> Path:
    """A TOML config file with only the given keys: write_config(p, supervisor={"x": 1})."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {value!r}".replace("'", '"') if not isinstance(value, bool)
                         else f"{key} = {str(value).lower()}")
    path.write_text("\n".join(lines) + "\n")
    return path


class NodeProcess:
    """`scripts/node ARGS` in its own process group; stdout lines and stderr log collected."""

    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None, name: str = "node"):
        self.port = None
        self.log_path = tmp_path / f"{name}-{time.monotonic_ns()}.log"
        self.stdout_lines: list[str] = []
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(ROOT / "scripts" / "node"), *args],
                                         stdout=subprocess.PIPE, stderr=log, env=env,
                                         cwd=tmp_path, start_new_session=True, text=True)
        self.reader = threading.Thread(target=self._read_stdout, daemon=True)
        self.reader.start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> str:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode} before ready:\n"
                                     f"{self.log()[-4000:]}")
            return next((l for l in self.stdout_lines if "ready" in l), None)
        return wait_for(ready, timeout, "the ready line")

    def wait_log(self, text: str, timeout: float = 20, count: int = 1) -> str:
        wait_for(lambda: self.log().count(text) >= count, timeout,
                 f"{text!r} x{count} in the log:\n{self.log()[-3000:]}")
        return self.log()

    def wait_exit(self, timeout: float = 30) -> int:
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node did not exit within {timeout}s:\n{self.log()[-3000:]}")
        # The exit can beat the reader thread to the last stdout lines: wait for its EOF
        # (bounded: a child that outlives the supervisor may still hold the pipe open).
        self.reader.join(5)
        return status

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def child_pid(self, fragment: str) -> int:
        """Pid of the child whose command line contains `fragment` (e.g. '"shard": 1')."""
        for child in self.children():
            try:
                if fragment in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no child matching {fragment!r}")

    def kill_tree(self) -> list[int]:
        """SIGKILL the supervisor and every child at once (children run in their own
        process groups); returns the children's pids."""
        children = self.children()
        for proc in [psutil.Process(self.pid), *children] if children or alive(self.pid) else []:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return [c.pid for c in children]

    def kill_all(self) -> None:
        """Teardown: SIGKILL the whole tree, whatever state it is in."""
        try:
            self.kill_tree()
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric(text: str, series: str) -> float | None:
    """Value of one exact series line (`name{labels}`) in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def request(endpoint: str, msg: dict, timeout_ms: int = 5000) -> dict:
    """One request over a DEALER socket, as a client would send it."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(msgpack.packb(msg))
        if not sock.poll(timeout_ms):
            raise AssertionError(f"no reply to {msg} within {timeout_ms} ms")
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close()
