"""One supervised child slot (the router, or shard i) and how its process ended.

A slot outlives its processes: when shard 1 dies, the same `Child` respawns it, counts
the restart and keeps its backoff. The supervisor owns the loop; this module only holds
per-slot state and the small decisions about it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

# Test hook: run stand-in child programs speaking the same status protocol.
SHARD_MODULE = os.environ.get("SHARDKV_SHARD_MODULE", "shard.worker")
ROUTER_MODULE = os.environ.get("SHARDKV_ROUTER_MODULE", "node.router")


class Child:
    def __init__(self, role: str, shard: int | None, spec: dict, backoff_initial: float,
                 backoff_max: float):
        self.role = role
        self.shard = shard
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.ready = False            # this incarnation reported ready
        self.ever_ready = False       # some incarnation of this slot reported ready
        self.restarts = 0
        self.started_at = 0.0
        self.last_seen = 0.0          # monotonic time of the last status message
        self.snapshot: dict | None = None
        self.respawn_at: float | None = None
        self.backoff_initial = backoff_initial
        self.inherit_fds: tuple[int, ...] = ()   # open in the child too (the data dir lock)
        self.backoff_max = backoff_max
        self.backoff = backoff_initial
        self.term_sent = False
        self.fatal_error: str | None = None   # reported by the child before exiting
        self.kill_reason: str | None = None   # why the supervisor SIGKILLed it, if it did

    @property
    def name(self) -> str:
        return "router" if self.role == "router" else f"shard {self.shard}"

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def command(self) -> list[str]:
        module = ROUTER_MODULE if self.role == "router" else SHARD_MODULE
        spec = dict(self.spec, restarts=self.restarts, supervisor_pid=os.getpid())
        return [sys.executable, "-m", module, "--spec", json.dumps(spec)]

    def spawn(self) -> None:
        # The child's stdout goes to our stderr: our stdout carries only the `ready` line.
        # Its own process group keeps a terminal's Ctrl-C (SIGINT to the foreground group)
        # away from it, so the supervisor alone decides the stop order (router first).
        # It inherits the data dir's lock fd (datadir.DataDirLock): the node keeps the
        # data dir until its last process exits, supervisor or not.
        self.proc = subprocess.Popen(self.command(), stdout=sys.stderr.fileno(),
                                     stdin=subprocess.DEVNULL, process_group=0,
                                     pass_fds=self.inherit_fds)
        self.pid = self.proc.pid
        self.ready = False
        self.term_sent = False
        self.fatal_error = None
        self.kill_reason = None
        self.started_at = self.last_seen = time.monotonic()
        self.respawn_at = None

    def exited(self, status: int) -> None:
        """Record the reaped status so Popen does not try to wait for the pid again."""
        if self.proc is not None:
            self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.pid = None
        self.proc = None
        self.ready = False
        self.snapshot = None

    def mark_ready(self, now: float) -> None:
        self.ready = self.ever_ready = True
        self.last_seen = now

    def schedule_respawn(self, now: float) -> float:
        """Next respawn after the current backoff; a child that stayed up long resets it."""
        if now - self.started_at > self.backoff_max:
            self.backoff = self.backoff_initial
        delay = self.backoff
        self.backoff = min(self.backoff * 2, self.backoff_max)
        self.respawn_at = now + delay
        return delay

    def send(self, sig: int) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:   # already dead, not yet reaped
                pass
            if sig == signal.SIGTERM:
                self.term_sent = True


def describe_exit(status: int) -> str:
    """'exited with status 3', 'was killed by SIGKILL', ... from a waitpid status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name}" + (" (core dumped)" if os.WCOREDUMP(status) else "")
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


def exit_code(status: int) -> int | None:
    """The exit status of a waitpid status, None when the process died by a signal."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
