"""Child-process plumbing shared by the shard worker (shard/worker.py) and the router
(node/router.py): the exit status that tells the supervisor not to respawn, the
parent-death signal, the status PUSH to the supervisor, the signal wakeup pipe, the
opt-in whole-process profile, the GC tuning and malloc_trim, and the --spec argument.
"""
import argparse
import collections
import ctypes
import gc
import json
import os
import signal
import sys
import time

import zmq

from shard import messages as m

# Boot failed for a non-transient reason (a config or data error): the supervisor does not
# respawn a child that exits with it (sysexits.h EX_CONFIG).
EXIT_FATAL = 78
# A write to a shard's database failed (disk full, I/O error): the shard answered what it
# held and exited to be started again from its disk (sysexits.h EX_TEMPFAIL). Respawned.
EXIT_STORAGE = 75

# Loaded once, at import: set_parent_death_signal also runs as a preexec_fn (between fork
# and exec, scripts/benchmarks/procs.py), where loading a library could deadlock on a lock
# another thread of the parent held.
try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:          # not glibc Linux
    _LIBC = None


def load_malloc_trim():
    """glibc's malloc_trim (returns free heap pages to the OS), or None elsewhere."""
    return getattr(_LIBC, "malloc_trim", None)


def set_parent_death_signal(sig=signal.SIGTERM) -> None:
    """Ask Linux to send `sig` when the parent dies (prctl PR_SET_PDEATHSIG)."""
    prctl = getattr(_LIBC, "prctl", None)
    if prctl is not None:  # else: not Linux; the getppid() check in the loop timers still applies
        prctl(1, int(sig), 0, 0, 0)


class SupervisorLink:
    """PUSH of status messages to the supervisor; never blocks when nobody listens."""

    def __init__(self, ctx: zmq.Context, run_dir: str, role: str, shard=None):
        self.role, self.shard = role, shard
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 16)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.connect(f"ipc://{run_dir}/supervisor.sock")

    def send(self, kind: str, **fields) -> None:
        msg = {"kind": kind, "role": self.role, "pid": os.getpid(), **fields}
        if self.shard is not None:
            msg["shard"] = self.shard
        try:
            self.sock.send(m.pack(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # supervisor absent or slow: status is best effort

    def close(self) -> None:
        self.sock.close()

    def fatal(self, error: str) -> None:
        """Report a boot failure and make sure it leaves before the process exits: a plain
        close() at exit can drop the queued message, because the context is never
        terminated and so LINGER never applies. destroy() closes every socket of the
        context and waits (at most the linger) for the message to be delivered."""
        self.send("fatal", error=error)
        self.sock.context.destroy(linger=2000)


class SignalPipe:
    """Signal handlers only record the signal; the pipe wakes the poller (STYLE.md)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        signal.set_wakeup_fd(self.w)
        self.received = collections.deque()
        for sig in signals:
            signal.signal(sig, lambda signum, frame: self.received.append(signum))

    def drain(self) -> list:
        try:
            while os.read(self.r, 512):
                pass
        except BlockingIOError:
            pass
        got = list(self.received)
        self.received.clear()
        return got


class ProcessProfile:
    """Opt-in cProfile of a whole child process: with SHARDKV_PROFILE_DIR set, the stats
    are dumped to <dir>/<name>-<pid>.prof on graceful exit (open with `python -m pstats`).
    SHARDKV_PROFILE_CLOCK=cpu times functions in process CPU time instead of wall time,
    which keeps a profile meaningful on a loaded machine (waits drop out)."""

    ENV = "SHARDKV_PROFILE_DIR"
    CLOCK_ENV = "SHARDKV_PROFILE_CLOCK"

    def __init__(self, name: str):
        self.name = name
        self.dir = os.environ.get(self.ENV) or None
        self.profiler = None

    def __enter__(self):
        if self.dir:
            import cProfile
            cpu = os.environ.get(self.CLOCK_ENV) == "cpu"
            self.profiler = cProfile.Profile(time.process_time) if cpu else cProfile.Profile()
            self.profiler.enable()
        return self

    def __exit__(self, *exc_info):
        if self.profiler is None:
            return
        self.profiler.disable()
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.profiler.dump_stats(os.path.join(self.dir, f"{self.name}-{os.getpid()}.prof"))
        except OSError as exc:
            sys.stderr.write(f"{self.name}: cannot write profile: {exc}\n")


GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """After boot: keep the objects made so far out of every collection (gc.freeze) and
    collect generation 0 every 50,000 allocations instead of 700. The hot paths allocate
    many short-lived lists/tuples/dicts that die by refcount; default thresholds spent
    ~6% of the router's CPU in collections that found nothing (perf profile)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)


def parse_spec(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="JSON child spec from the supervisor")
    return json.loads(parser.parse_args(argv).spec)
