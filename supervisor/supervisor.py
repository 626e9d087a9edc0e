"""Supervisor: spawns the shard workers and the router, watches them, stops them.

One loop (gunicorn's arbiter shape): a zmq.Poller waits on the status PULL socket and
on a signal wakeup pipe; signal handlers only enqueue; each queued signal maps to a
`handle_<name>` method; after every poll the children are reaped (waitpid(-1, WNOHANG))
and the timers run (boot and heartbeat expiry, respawn backoff, stop escalation).

Children push msgpack status maps to `ipc://<run>/supervisor.sock`:
  {"kind": "ready", "role", "shard"?, "pid"}          booted (router: all shards answered)
  {"kind": "fatal", "role", "shard"?, "error"}        cannot boot; the child then exits 78
  {"kind": "stats", "role", "shard"?, "snapshot"}     heartbeat + metrics snapshot
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time

import msgpack
import zmq

from shard.process import EXIT_FATAL, EXIT_STORAGE
from supervisor import datadir, observability, restore, rundir
from supervisor.children import Child, describe_exit, exit_code

log = logging.getLogger("shardkv.supervisor")

POLL_MAX_SECS = 0.25
LAST_WORDS_SECS = 1.0   # how long a dead, never-ready child's `fatal` message is awaited


class Supervisor:
    SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGCHLD: "chld",
               signal.SIGHUP: "hup"}

    def __init__(self, config: dict):
        self.config = config
        self.sup = config["supervisor"]
        self.data_dir = config["node"]["data_dir"]
        self.shard_count = config["node"]["shards"]
        self.children: list[Child] = []
        self.sig_queue: list[int] = []
        self.state = "booting"          # booting -> running -> stopping -> stopped
        self.exit_code = 0
        self.stop_phase: list[Child] = []
        self.stop_deadline = 0.0
        self.announced = False
        self.lock: datadir.DataDirLock | None = None
        self.run_dir: str | None = None
        self.ctx: zmq.Context | None = None
        self.pull: zmq.Socket | None = None
        self.wakeup_r = self.wakeup_w = -1
        self.metrics = observability.make_metrics_state(config)
        self.metrics_url: str | None = None
        self.metrics_server = None

    # -- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.prepare()
            self.spawn_all()
            while self.state != "stopped":
                self.loop_once()
        except (datadir.DataDirError, restore.RestoreError) as exc:
            log.error("%s", exc)
            self.exit_code = 1
        except OSError as exc:   # e.g. a port in use: the message names it
            log.error("cannot start: %s", exc)
            self.exit_code = 1
        finally:
            self.cleanup()
        log.info("supervisor exiting with status %d", self.exit_code)
        return self.exit_code

    def prepare(self) -> None:
        """Own the data dir and set up the run dir, status socket and signals; the data
        dir's shard count is recorded last, once none of this failed."""
        log.info("starting shardkv: %d shards, data dir %s", self.shard_count, self.data_dir)
        datadir.ensure_data_dir(self.data_dir)
        self.lock = datadir.DataDirLock(self.data_dir).acquire("starting another node")
        datadir.check_shard_count(self.data_dir, self.shard_count)
        restore.finish_interrupted(self.data_dir)
        stale = rundir.remove_stale_run_dirs()
        if stale:
            log.info("removed %d run dir(s) of supervisors that were killed", len(stale))
        self.run_dir = rundir.make_run_dir()
        log.info("run dir %s", self.run_dir)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(f"ipc://{self.run_dir}/supervisor.sock")
        self.metrics_url, self.metrics_server = observability.start_metrics_server(
            self.config, self.metrics)
        self.install_signals()
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.wakeup_r, zmq.POLLIN)
        datadir.record_shard_count(self.data_dir, self.shard_count)

    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self.enqueue_signal)

    def enqueue_signal(self, sig, frame) -> None:
        self.sig_queue.append(sig)   # the only thing a handler does

    def spawn_all(self) -> None:
        spec = {"shards": self.shard_count, "data_dir": self.data_dir,
                "run_dir": self.run_dir, "config": self.config}
        initial, most = self.sup["restart_backoff_initial_secs"], self.sup["restart_backoff_max_secs"]
        for i in range(self.shard_count):
            self.children.append(Child("shard", i, dict(spec, role="shard", shard=i), initial, most))
        self.children.append(Child("router", None, dict(spec, role="router"), initial, most))
        for child in self.children:
            self.spawn(child)

    def spawn(self, child: Child) -> None:
        child.inherit_fds = (self.lock.fd,) if self.lock is not None and self.lock.fd is not None else ()
        child.spawn()
        log.info("started %s (pid %d)", child.name, child.pid)
        self.report_child(child)

    def cleanup(self) -> None:
        """Leave nothing behind, also after a bug: no child, no run dir, no lock."""
        for child in self.children:
            if child.alive:
                child.send(signal.SIGKILL)
                try:
                    os.waitpid(child.pid, 0)
                except ChildProcessError:
                    pass
                child.exited(0)
        observability.stop_metrics_server(self.metrics_server)
        if self.wakeup_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
        if self.pull is not None:
            self.pull.close(linger=0)
        if self.ctx is not None:
            self.ctx.term()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()

    # -- the loop ------------------------------------------------------------------------

    def loop_once(self) -> None:
        events = dict(self.poller.poll(self.poll_timeout() * 1000))
        if self.wakeup_r in events:
            self.drain_wakeup()
        while self.sig_queue:
            sig = self.sig_queue.pop(0)
            getattr(self, f"handle_{self.SIGNALS[sig]}")()
        if self.pull in events:
            self.read_status()
        self.reap()
        self.run_timers()

    def poll_timeout(self) -> float:
        now = time.monotonic()
        waits = [POLL_MAX_SECS]
        waits += [c.respawn_at - now for c in self.children if c.respawn_at is not None]
        if self.state == "stopping":
            waits.append(self.stop_deadline - now)
        return max(0.0, min(waits))

    def drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    # -- signals -------------------------------------------------------------------------

    def handle_term(self) -> None:
        self.stop_requested("SIGTERM")

    def handle_int(self) -> None:
        self.stop_requested("SIGINT")

    def handle_chld(self) -> None:
        pass   # reap() runs after every poll

    def handle_hup(self) -> None:
        log.info("SIGHUP ignored: the configuration is read at start only")

    def stop_requested(self, name: str) -> None:
        if self.state == "stopping":
            log.warning("%s again while stopping: killing every child now", name)
            for child in self.children:
                child.send(signal.SIGKILL)
            self.stopped_unclean()
            return
        log.info("%s received: stopping gracefully (router first, then shards)", name)
        self.begin_stop(0)

    # -- status messages -----------------------------------------------------------------

    def read_status(self) -> None:
        while True:
            try:
                frame = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            except Exception:   # a child bug must not take the supervisor down
                log.warning("ignoring an unparseable status frame (%d bytes)", len(frame))
                continue
            child = self.child_for(msg)
            if child is not None:
                self.handle_status(child, msg)

    def child_for(self, msg) -> Child | None:
        if not isinstance(msg, dict):
            return None
        role, shard, pid = msg.get("role"), msg.get("shard"), msg.get("pid")
        for child in self.children:
            if child.role == role and (role == "router" or child.shard == shard):
                # A message from an earlier incarnation (pid given and different) is stale.
                if child.alive and (pid is None or pid == child.pid):
                    return child
        return None

    def handle_status(self, child: Child, msg: dict) -> None:
        now = time.monotonic()
        child.last_seen = now
        kind = msg.get("kind")
        if kind == "ready" and not child.ready:
            first = not child.ever_ready
            child.mark_ready(now)
            log.info("%s ready (pid %d)%s", child.name, child.pid, "" if first else ", back up")
            self.report_child(child)
            self.maybe_announce()
        elif kind == "fatal":
            child.fatal_error = str(msg.get("error", "no reason given"))
            if self.state != "stopping":
                self.halt(f"{child.name} cannot start: {child.fatal_error}")
        elif kind == "stats" and isinstance(msg.get("snapshot"), dict):
            child.snapshot = msg["snapshot"]
            self.metrics.update(child.role, child.shard, child.snapshot)

    def maybe_announce(self) -> None:
        if self.announced or self.state != "booting" or not all(c.ready for c in self.children):
            return
        self.state = "running"
        self.announced = True
        metrics = f"metrics on {self.metrics_url}" if self.metrics_url else "metrics off"
        shards = f"{self.shard_count} shard{'' if self.shard_count == 1 else 's'}"
        print(f"shardkv ready: {shards}, listening on "
              f"{self.config['node']['listen']}, {metrics}", flush=True)

    def report_child(self, child: Child) -> None:
        self.metrics.set_child(child.role, child.shard, child.pid, child.ready, child.restarts)

    # -- reaping and restarts ------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children if c.pid == pid), None)
            if child is None:
                continue
            if self.state != "stopping" and (not child.ever_ready or exit_code(status) == EXIT_FATAL):
                self.await_last_words(child)
            self.child_ended(child, status)

    def await_last_words(self, child: Child) -> None:
        """A child that fails to boot sends `fatal` and exits at once; SIGCHLD may beat its
        message through the socket, so give the message a moment to arrive."""
        deadline = time.monotonic() + LAST_WORDS_SECS
        while child.fatal_error is None:
            self.read_status()
            left = deadline - time.monotonic()
            if child.fatal_error is not None or left <= 0:
                return
            self.pull.poll(left * 1000)

    def child_ended(self, child: Child, status: int) -> None:
        how = describe_exit(status)
        was_ready, ever_ready, old_pid = child.ready, child.ever_ready, child.pid
        why = child.kill_reason
        child.exited(status)
        self.report_child(child)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            log.warning("%s (pid %d) was killed by SIGKILL", child.name, old_pid)
        else:
            log.log(logging.INFO if self.state == "stopping" else logging.WARNING,
                    "%s (pid %d) %s", child.name, old_pid, how)
        if self.state == "stopping":
            if child.role == "shard" and exit_code(status) != 0:
                self.stopped_unclean()     # killed or failed mid-stop: it did not flush
            return
        if child.fatal_error:
            self.halt(f"{child.name} cannot start: {child.fatal_error}")
        elif exit_code(status) == EXIT_FATAL:
            self.halt(f"{child.name} {how} (a non-transient boot failure; see its log above)")
        elif not ever_ready:
            self.halt(f"{child.name} {how} before it ever became ready; see its log above")
        else:
            delay = child.schedule_respawn(time.monotonic())
            if exit_code(status) == EXIT_STORAGE:
                why = "a write to its disk failed; the new one opens its database from disk"
            why = why or ("" if was_ready else "it died while booting")
            log.info("restarting %s in %.1fs (restart #%d)%s", child.name, delay,
                     child.restarts + 1, f" ({why})" if why else "")

    # -- timers --------------------------------------------------------------------------

    def run_timers(self) -> None:
        now = time.monotonic()
        if self.state == "stopping":
            self.advance_stop(now)
            return
        for child in self.children:
            if child.respawn_at is not None and now >= child.respawn_at:
                self.respawn(child, now)
            elif child.alive and not child.ready:
                if now - child.started_at > self.sup["boot_timeout_secs"]:
                    self.boot_expired(child)
            elif (child.alive and child.kill_reason is None
                  and now - child.last_seen > self.sup["heartbeat_timeout_secs"]):
                log.warning("%s (pid %d) sent no status for %.1fs: hung, killing it",
                            child.name, child.pid, now - child.last_seen)
                child.kill_reason = "it was hung"
                child.send(signal.SIGKILL)   # the reaper restarts it

    def respawn(self, child: Child, now: float) -> None:
        """A respawn that fails (out of fds or memory, EMFILE/ENOMEM) is a failed restart,
        tried again after the backoff: unlike a child that cannot boot, it says nothing
        about the node, and ending the node for it would take every other child down."""
        child.restarts += 1
        try:
            self.spawn(child)
        except OSError as exc:
            child.restarts -= 1
            child.started_at = now    # a start that lasted no time: the backoff grows
            delay = child.schedule_respawn(now)
            log.error("cannot restart %s: %s; trying again in %.1fs", child.name, exc, delay)

    def boot_expired(self, child: Child) -> None:
        secs = self.sup["boot_timeout_secs"]
        if not child.ever_ready:
            self.halt(f"{child.name} did not report ready within {secs}s "
                      f"(supervisor.boot_timeout_secs)")
        else:
            log.warning("%s (pid %d) did not come back up within %ss: killing it",
                        child.name, child.pid, secs)
            child.kill_reason = "it did not boot in time"
            child.send(signal.SIGKILL)
            child.started_at = time.monotonic()   # one kill per expiry; the reaper restarts

    # -- stopping ------------------------------------------------------------------------

    def halt(self, message: str) -> None:
        log.error("halting: %s", message)
        self.begin_stop(1)

    def begin_stop(self, exit_code: int) -> None:
        if self.state == "stopping":
            return
        self.state = "stopping"
        self.exit_code = exit_code
        for child in self.children:
            child.respawn_at = None
            if child.role == "shard" and not child.alive:
                self.stopped_unclean()     # down, waiting for its restart: it flushes nothing
        self.start_phase([c for c in self.children if c.role == "router"])

    def start_phase(self, targets: list[Child]) -> None:
        self.stop_phase = [c for c in targets if c.alive]
        self.stop_deadline = time.monotonic() + self.sup["shutdown_grace_secs"]
        for child in self.stop_phase:
            log.info("stopping %s (pid %d)", child.name, child.pid)
            child.send(signal.SIGTERM)

    def stopped_unclean(self) -> None:
        # A child killed during the stop did not finish it (a shard did not flush; its
        # commits are safe in the WAL and replay at the next start): PROTOCOL.md's exit
        # status 0 means every shard flushed, so say otherwise.
        if self.exit_code == 0:
            self.exit_code = 1

    def advance_stop(self, now: float) -> None:
        pending = [c for c in self.stop_phase if c.alive]
        if pending and now >= self.stop_deadline:
            for child in pending:
                log.warning("%s (pid %d) did not stop within %ss: SIGKILL", child.name,
                            child.pid, self.sup["shutdown_grace_secs"])
                child.send(signal.SIGKILL)
            self.stopped_unclean()
            self.stop_deadline = now + self.sup["shutdown_grace_secs"]
            return
        if pending:
            return
        rest = [c for c in self.children if c.alive]
        if rest:
            self.start_phase(rest)
        else:
            log.info("all children stopped")
            self.state = "stopped"
