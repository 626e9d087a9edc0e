"""ShardWorker: the process loop around one ShardEngine.

    python -m shard.worker --spec '{"role": "shard", "shard": 0, "shards": 2,
                                    "data_dir": ..., "run_dir": ..., "config": {...}}'

The router connects over a Unix domain socket (shard/link.py: length-prefixed frames;
the client side of the node is ZeroMQ, this internal hop is not, for latency). One loop
pass: poll (timeout), accept new peers, read what each peer sent (a bounded number of
bytes), dispatch each message to handle_<op>, engine.sync() once (group commit), send
every reply of the pass (one frame per peer), then run one slice of background work
(freeing a flushed memtable, a flush step or a prune step), paced while requests come
in (MAINTENANCE_PACE). Nothing is acknowledged or shown before the sync. Reads meeting
a key prepared at or below their snapshot are deferred (the snapshot pinned) and retried
after each commit_prepared/abort_prepared, until `router.read_wait_secs`, then answered
`unavailable`.

Disk full (README "Disk full"): below `[durability] min_free_bytes` free
the shard refuses new writes and keeps serving reads (shard/diskspace.py); a write that
fails anyway makes every reply of its pass `unavailable` and the process exit for a
restart from disk (storage_failed); a shard whose database cannot be opened for writing
for want of space opens it read-only and reopens it for writing once there is room.
"""
import collections
import errno
import math
import os
import secrets
import select
import sys
import time
from bisect import bisect_left

import zmq

from shard import messages as m
from shard.busypoll import BusyPoller, busy_poll_secs
from shard.config import EngineConfig
from shard.damage import DamagedDatabase
from shard.diskspace import DiskGuard, free_bytes, mib, wal_bytes
from shard.engine import ShardEngine
from shard.errors import Blocked, BadRequest, Conflict, TooOld, Unavailable
from shard.histogram import Histogram, quantile
from shard.link import POLLOUT, FrameListener
from shard.process import (EXIT_FATAL, EXIT_STORAGE, ProcessProfile, SignalPipe, SupervisorLink,
                           load_malloc_trim, parse_spec, set_parent_death_signal, tune_gc)
from shard.storage import StorageWriteError

POLL_MS = 50              # idle poll timeout (timers run at least this often)
FLUSH_WAIT_POLL_MS = 2    # poll timeout while a flush waits for RocksDB to write its SST
# While requests come in, a slice of background work (flush, prune, freeing) is followed
# by at least MAINTENANCE_PACE times its duration without one: the shard then spends at
# most a third of its time on it. Measured on 2 cores, 2 shards, an explicit flush of ~300K
# versions per shard under transfer load: unpaced, P50 3.3-3.6 ms and P99 17-21 ms for
# the txns during the flush and 55 of them served; at 2.0, P50 0.7-1.3 ms, P99 8-10 ms and
# about 250 served, the flush taking 0.85 s instead of 0.52 s. Idle, slices run back to back.
MAINTENANCE_PACE = 2.0
TPS_WINDOW_SECS = 5.0
# glibc keeps freed heap memory that is not at the top of the heap. Under RocksDB's
# block-cache churn a shard that was never restarted crept from ~190 to 249 MiB RSS in
# 21 minutes (a soak without kills); one malloc_trim(0) gave 70 MB of it back. So a shard
# trims once a minute: ~10-25 ms on a fragmented heap of a few hundred MiB.
MALLOC_TRIM_SECS = 60.0
# A peer with more unsent reply bytes than this is not read from until they drain
# (link.FrameStream.out_cap): the router reads every pass, so only a peer that sends and
# never reads (a stuck tool) meets it, and without it such a peer grew the shard's memory
# by 100 KB per read of a 100 KB value, without bound.
PEER_OUT_CAP = 64 << 20
# A read-only shard (its disk too full to open the database for writing) tries to reopen
# it for writing once the free space looks enough, then again after twice as long each
# time it is still not (an attempt replays the whole log, twice).
REOPEN_BACKOFF_SECS = (1.0, 60.0)
# How long a shard whose disk write failed waits for its last replies to drain out.
LAST_REPLIES_SECS = 2.0
# storage_failed ends the process with this: no interpreter shutdown, whose close of
# RocksDB would try to flush into the same error. (In-process tests replace it.)
hard_exit = os._exit
# Free space is measured this often (statvfs, ~1 us): at 50 ms a shard writing 100 MB/s
# uses 5 MB of the reserve between two looks.
DISK_CHECK_SECS = 0.05
# A scan walks at most this many rows on disk per loop pass (~10 ms), then goes on in the
# next pass: a range of deleted keys not yet pruned has rows to walk and nothing to list,
# and a scan over a few hundred thousand of them took seconds in one go, during which the
# shard answered nothing (the router counted it dead and the supervisor restarted it).
SCAN_SLICE_ROWS = 5_000
# How long a scan may go on before it is answered `unavailable` (the router answers the
# client at its request_timeout_secs, 5 s by default, anyway).
SCAN_DEADLINE_SECS = 30.0
SCAN_LATE = "scan ran too long"
# A going scan's message keeps the items of its earlier slices under this key, one no
# decoded message can hold.
SCANNED_SO_FAR = object()
# Ops that always write, refused whole while writes are (read-only, or low on space): a
# checkpoint too, since RocksDB flushes every memtable to make one. commit (only with
# writes) and block (only to a new height) decide in their handlers.
WRITING_OPS = frozenset({m.PREPARE, m.FLUSH, m.PRUNE, m.CHECKPOINT})


# ---------------------------------------------------------------- the worker

class Deferred:
    """A read waiting for a prepared txn's outcome, or a scan going on a slice per loop
    pass, with its snapshot pinned; `late`: the answer once past its deadline."""
    __slots__ = ("peer", "msg", "deadline", "pin", "late")

    def __init__(self, peer, msg, deadline, pin, late):
        self.peer, self.msg, self.deadline, self.pin, self.late = peer, msg, deadline, pin, late


class ScanContinues(Exception):
    """A retried scan ran out of its slice again: it stays deferred, for the next pass."""


class ShardWorker:
    def __init__(self, spec: dict):
        self.shard = int(spec["shard"])
        self.shards = int(spec["shards"])
        self.config = spec["config"]
        self.path = os.path.join(spec["data_dir"], f"shard-{self.shard}")
        self.run_dir = spec["run_dir"]
        self.endpoint = os.path.join(self.run_dir, f"shard-{self.shard}.sock")
        self.inc = secrets.token_hex(8)      # incarnation: new on every start
        router_cfg = self.config.get("router", {})
        self.read_wait = float(router_cfg.get("read_wait_secs", 1.0))
        self.stats_interval = float(self.config.get("supervisor", {}).get("stats_interval_secs", 0.5))
        self.busy_poll_secs = busy_poll_secs(self.config)
        prune_cfg = self.config.get("prune", {})
        self.keep_versions = int(prune_cfg.get("keep_versions", 3))
        self.auto_prune_secs = float(prune_cfg.get("auto_interval_secs", 0))
        self.engine = None
        self.ctx = zmq.Context.instance()
        self.listener = None
        self.peers = {}              # fd -> connected FrameStream (the router; tests)
        self.status = None
        self.signals = None
        self.parent = os.getppid()
        self.stopping = False
        # per-pass state
        self.out = {}                # peer stream -> [reply, ...]
        self.durable_waits = []      # receive times of commit-path messages this pass
        self.unblocked = False       # a commit_prepared/abort_prepared ran this pass
        self.deferred = []           # [Deferred]
        # maintenance jobs: at most one flush and one prune in progress
        self.flush_job = None        # {"before": flush stats, "waiters": [(peer, rid, reply-builder)]}
        self.prune_job = None
        self.prune_queue: list = []       # [(keep, waiter)]: prunes asking another keep than the running one
        self.last_prune = time.monotonic()
        self.maintenance_after = 0.0  # no background slice before this (monotonic): pacing
        # metrics
        self.latency = Histogram()
        self.counts = {"committed": 0, "conflict": 0, "error": 0}
        self.twopc = {"prepared": 0, "committed": 0, "aborted": 0}
        self.tps_samples = collections.deque()
        self.next_stats = 0.0
        self.malloc_trim = load_malloc_trim()
        self.next_trim = time.monotonic() + MALLOC_TRIM_SECS
        # disk full (module docstring)
        min_free = int(self.config.get("durability", {}).get("min_free_bytes", 0))
        self.guard = DiskGuard(self.path, min_free, self.shard)
        self.read_only_reason = None      # set while the database is open read-only
        self.read_only_cause = None       # ...and the error of the read-write open
        self.next_reopen = 0.0
        self.reopen_backoff = REOPEN_BACKOFF_SECS[0]
        self.storage_error = None         # the StorageWriteError of this pass, if one failed
        self.next_disk_check = 0.0
        self.damage_reported = set()      # DamagedDatabase messages already logged

    # -- lifecycle

    def boot(self) -> None:
        self.status = SupervisorLink(self.ctx, self.run_dir, "shard", self.shard)
        try:
            if os.path.isdir(self.path):
                self.guard.check()         # before the open: its flush may not fit
            self.engine = self.open_engine()
            # Built now, not at the first flush: a bad [batch_writer] or SHARDKV_ADAPT_*
            # value is then a boot error reported to the supervisor, not a traceback later.
            self.engine.writer
            self.listener = FrameListener(self.endpoint, out_cap=PEER_OUT_CAP)
        except Exception as exc:  # every boot failure here is non-transient: halt, report
            sys.stderr.write(f"shard {self.shard}: cannot boot: {exc}\n")
            self.status.fatal(f"shard {self.shard}: {type(exc).__name__}: {exc}")
            sys.exit(EXIT_FATAL)
        self.signals = SignalPipe()
        self.poller = zmq.Poller()
        self.waiter = BusyPoller(self.poller, self.busy_poll_secs)
        self.poller.register(self.listener.fd, zmq.POLLIN)
        self.poller.register(self.signals.r, zmq.POLLIN)
        if self.config.get("flush", {}).get("flush_on_start", True) and not self.writes_refused:
            self.start_flush()
        if self.engine.storage.recovery_note:
            sys.stderr.write(f"shard {self.shard}: {self.engine.storage.recovery_note}\n")
        if self.writes_refused:
            sys.stderr.write(f"{self.writes_refused}\n")
        self.status.send("ready")

    def open_engine(self) -> ShardEngine:
        """The engine, read-write; read-only when the disk is too full for RocksDB to open
        the database for writing (it writes a new MANIFEST, and the log's rows to SST
        files), so a shard on a full disk still serves reads. Low on space, the open does
        not flush what it replays: its SST could take the last free bytes."""
        config = EngineConfig.from_dict(self.config)
        if self.guard.low:
            config.flush_on_start = False
        try:
            engine = ShardEngine.open(self.path, self.shard, self.shards, config)
        except StorageWriteError as exc:
            if not exc.no_space:
                raise
            cause = exc
        else:
            self.read_only_reason = None
            return engine
        engine = ShardEngine.open(self.path, self.shard, self.shards, config, read_only=True)
        self.read_only_cause = cause
        self.read_only_reason = self.read_only_message(cause)
        return engine

    def reopen_needs(self) -> int:
        """Free bytes a read-write open should find: twice the write-ahead log (RocksDB's
        recovery writes its rows to SST files, then the engine flushes what it replays),
        a MiB for RocksDB's new MANIFEST, OPTIONS and info LOG, and min_free_bytes."""
        return self.guard.min_free + 2 * wal_bytes(self.path) + (1 << 20)

    def read_only_message(self, cause) -> str:
        need = self.reopen_needs()
        return (f"shard {self.shard}: read-only: its disk is full, the database cannot be "
                f"opened for writing ({cause}); reads are served, writes refused until about "
                f"{mib(need)} are free on the file system of {self.path} "
                f"({mib(free_bytes(self.path))} now; twice its write-ahead log, 1 MiB, and "
                f"[durability] min_free_bytes); free space there, e.g. delete checkpoints you "
                f"no longer need (`shardkv checkpoint delete NAME`)")

    def run(self) -> int:
        with ProcessProfile(f"shard{self.shard}"):
            self.boot()
            tune_gc()
            try:
                while not self.stopping:
                    self.loop_pass()
                return self.shutdown()
            except StorageWriteError as exc:
                self.storage_failed(exc)

    def shutdown(self) -> int:
        """Answer what waits, flush, close; the exit status (not 0 without the flush)."""
        for d in self.deferred:
            self.reply(d.peer, m.error(d.msg.get("rid"), "unavailable", "shard stopping", True))
            self.engine.unpin(d.pin)
        self.deferred = []
        self.finish_flush()
        self.engine.sync()
        self.send_replies()
        if self.writes_refused:
            # A flush could take the last free bytes; the log holds every commit anyway.
            sys.stderr.write(f"shard {self.shard}: stopping without a flush ({self.writes_refused}); "
                             f"its commits replay from its log at the next start\n")
            status = EXIT_STORAGE      # not 0: PROTOCOL.md's graceful stop flushes every shard
        else:
            self.engine.flush()
            status = 0
        self.engine.close()
        for peer in list(self.peers.values()):
            peer.close()
        self.listener.close()
        self.status.close()
        return status

    # -- the loop

    def loop_pass(self) -> None:
        # No busy polling while background work is paced: its waits leave the CPU to others.
        events = self.waiter.poll(self.poll_timeout_ms(), spin=not self.background_pending)
        if self.signals.r in events:
            for sig in self.signals.drain():
                self.handle_signal(sig)
        if self.listener.fd in events:
            for peer in self.listener.accept():
                self.peers[peer.fd] = peer
                peer.sync_poller(self.poller)
        served = False
        for fd, flags in events.items():
            peer = self.peers.get(fd)
            if peer is None:
                continue
            if flags & POLLOUT or peer.backlogged:   # backlogged: also on POLLERR/POLLHUP
                peer.flush_out()
                peer.sync_poller(self.poller)   # drained: stop asking for POLLOUT
            if not peer.backlogged:     # else: not read until its replies drain
                received = time.monotonic()
                for frame in peer.read_frames():
                    served = True
                    self.handle_frame(peer, frame, received)
            if peer.closed:
                self.drop_peer(peer)
        now = self.finish_pass()
        if now >= self.next_disk_check:
            self.next_disk_check = now + DISK_CHECK_SECS
            self.check_disk()
        if self.background_pending and now >= self.maintenance_after:
            # One slice of background work, after this pass's replies are out, so it never
            # delays an acknowledgement (tail latency).
            started = now
            self.maintenance_step()
            if self.out or (self.deferred and self.unblocked):
                now = self.finish_pass()   # answers of a job that just finished
            else:
                now = time.monotonic()
            if served:
                # Requests are coming in: leave the time the slice took to them (and to the
                # other processes on this machine's few cores) before the next slice.
                self.maintenance_after = now + (now - started) * MAINTENANCE_PACE
        self.run_timers(now)

    def finish_pass(self) -> float:
        """Group commit (one durable write for everything this pass staged), then every
        reply of the pass; returns the time after the sync. A write of the pass that
        failed (a handler's) stops it here too, before any reply goes out."""
        self.engine.sync()
        if self.storage_error is not None:
            raise self.storage_error
        now = time.monotonic()
        if self.durable_waits:
            self.observe_durable(now)
        if self.deferred:
            self.retry_deferred(now)
        self.send_replies()
        return now

    def observe_durable(self, now: float) -> None:
        """Commit latency (receive -> durable) of this pass: durable_waits holds receive
        times, or (receive time, count) for the txns of one `txns` message."""
        hist = self.latency
        for entry in self.durable_waits:
            if type(entry) is tuple:
                received, count = entry
                seconds = now - received
                hist.counts[bisect_left(hist.bounds, seconds)] += count
                hist.sum += seconds * count
                hist.count += count
            else:
                hist.observe(now - entry)
        self.durable_waits.clear()

    def handle_signal(self, sig) -> None:
        self.stopping = True

    def handle_frame(self, peer: bytes, frame: bytes, received: float) -> None:
        try:
            msg = m.unpack(frame)
            if not isinstance(msg, dict):
                raise ValueError("message is not a map")
        except Exception as exc:
            self.reply(peer, m.error(None, "bad_request", f"undecodable message: {exc}"))
            return
        if msg.get("op") == m.MULTI:
            msgs = msg.get("msgs")
            if not isinstance(msgs, list):
                self.reply(peer, m.error(msg.get("rid"), "bad_request", "multi without msgs"))
                return
            inc = msg.get("inc")
            for sub in msgs:
                if isinstance(sub, dict):
                    sub.setdefault("inc", inc)
                    self.dispatch(peer, sub, received)
                else:
                    self.reply(peer, m.error(None, "bad_request", "message is not a map"))
        else:
            self.dispatch(peer, msg, received)

    def dispatch(self, peer, msg: dict, received: float) -> None:
        op, rid = msg.get("op"), msg.get("rid")
        if op != m.PING and msg.get("inc") != self.inc:
            self.reply(peer, m.error(rid, m.STALE_INC, "message for another shard incarnation", True))
            return
        # `type(op) is str` first: a list or map `op` is unhashable, and `in m.OPS` raised
        # outside any handler, which ended the shard.
        handler = (getattr(self, f"handle_{op}", None)
                   if type(op) is str and op in m.OPS and op != m.MULTI else None)
        if handler is None:
            self.reply(peer, m.error(rid, "bad_request", f"unknown op {op!r}"))
            return
        if self.storage_error is not None:
            # A write of this pass failed (storage_failed answers it all): run nothing more.
            self.reply(peer, m.error(rid, "unavailable", "not run: a disk write failed", True))
            return
        if op in WRITING_OPS and self.writes_refused:
            self.reply(peer, m.error(rid, "unavailable", self.writes_refused, True))
            return
        try:
            result = handler(peer, msg, received)
        except StorageWriteError as exc:
            self.storage_error = exc          # the loop's sync raises it again: storage_failed
            self.reply(peer, m.error(rid, "unavailable", str(exc), True))
        except Exception as exc:
            self.reply(peer, self.error_reply(rid, op, exc))
        else:
            if result is not None:
                self.reply(peer, result)

    def error_reply(self, rid, op, exc: Exception) -> dict:
        """The reply to a request whose handler raised `exc` (also a deferred read's)."""
        if isinstance(exc, Conflict):
            self.counts["conflict"] += 1
            return m.error(rid, "conflict", "read versions changed or key locked",
                           True, keys=list(exc.keys))
        if isinstance(exc, TooOld):
            return m.error(rid, "too_old", f"snapshot older than horizon {exc.horizon}",
                           False, horizon=exc.horizon)
        if isinstance(exc, BadRequest):
            return m.error(rid, "bad_request", str(exc))
        if isinstance(exc, Unavailable):
            return m.error(rid, "unavailable", str(exc), True, **exc.fields)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # a file of its own (a checkpoint's manifest), not the database: retry later
            return m.error(rid, "unavailable", f"shard {self.shard}: {op}: {exc}", True)
        if isinstance(exc, (KeyError, TypeError, ValueError, AttributeError, OverflowError)):
            return m.error(rid, "bad_request", f"malformed {op}: {exc!r}")
        if isinstance(exc, DamagedDatabase):      # a damaged SST block: say so in the log too
            if len(self.damage_reported) < 100 and str(exc) not in self.damage_reported:
                self.damage_reported.add(str(exc))
                sys.stderr.write(f"shard {self.shard}: {op}: {exc}\n")
        self.counts["error"] += 1     # a bug: answer it, never crash the shard
        return m.error(rid, "internal", f"{type(exc).__name__}: {exc}")

    def reply(self, peer, reply: dict) -> None:
        self.out.setdefault(peer, []).append(reply)

    def send_replies(self) -> None:
        for peer, replies in self.out.items():
            frame = m.pack(replies[0] if len(replies) == 1 else {"replies": replies})
            if peer.send(frame):   # False: the router went away; it times these out
                peer.sync_poller(self.poller)
            else:
                self.drop_peer(peer)
        self.out.clear()

    def drop_peer(self, peer) -> None:
        peer.close()
        if self.peers.get(peer.fd) is peer:
            del self.peers[peer.fd]

    # -- handlers: each returns a reply dict, or None when it answers later

    def handle_ping(self, peer, msg, received):
        st = self.engine.stats()
        return m.ok(msg.get("rid"), inc=self.inc, pid=os.getpid(), shard=self.shard,
                    max_ts=st.get("max_ts", 0), block=st.get("block_height", 0),
                    prepared=st.get("prepared", 0))

    def handle_read(self, peer, msg, received, retry=False):
        keys, at = msg["keys"], m.int_field(msg, "at")
        try:
            rows = self.engine.read(keys, at)
        except Blocked:
            if retry:
                raise
            return self.defer(peer, msg, received)
        return m.ok(msg["rid"], values=[v for v, _ in rows], versions=[ver for _, ver in rows])

    def handle_scan(self, peer, msg, received, retry=False):
        limit = m.int_field(msg, "limit")
        found = msg.get(SCANNED_SO_FAR)
        if found is None and limit < 1:
            raise BadRequest("limit must be an int >= 1")
        try:
            items, more, resume = self.engine.scan_slice(
                msg.get("start"), msg.get("end"), limit, m.int_field(msg, "at"), SCAN_SLICE_ROWS)
        except Blocked:
            if retry:
                raise
            return self.defer(peer, msg, received)
        if found:
            items = found + items
        if resume is None:
            return m.ok(msg["rid"], items=[list(it) for it in items], more=more)
        # Out of its slice: go on from `resume` in the next pass, the snapshot pinned. The
        # message is the shard's own copy: it carries the progress.
        msg["start"] = resume
        msg["limit"] = limit - (len(items) - len(found or ()))
        msg[SCANNED_SO_FAR] = items
        self.unblocked = True                   # retry_deferred runs it next pass
        if retry:
            raise ScanContinues()
        return self.defer(peer, msg, received, SCAN_DEADLINE_SECS, SCAN_LATE)

    def handle_validate(self, peer, msg, received):
        self.engine.validate(msg["reads"])
        return m.ok(msg["rid"])

    def handle_commit(self, peer, msg, received):
        if self.writes_refused and msg["writes"]:
            raise Unavailable(self.writes_refused)
        self.engine.commit(m.int_field(msg, "ts"), msg["reads"], msg["writes"])
        self.counts["committed"] += 1
        self.durable_waits.append(received)
        return m.ok(msg["rid"])

    def handle_prepare(self, peer, msg, received):
        self.engine.prepare(m.int_field(msg, "txn"), m.int_field(msg, "ts"), msg["reads"], msg["writes"],
                            list(msg["participants"]))
        self.twopc["prepared"] += 1
        self.durable_waits.append(received)
        return m.ok(msg["rid"])

    def handle_commit_prepared(self, peer, msg, received):
        txn = m.int_field(msg, "txn")
        if self.read_only_reason and txn not in self.engine.outcomes:
            raise Unavailable(self.read_only_reason, read_only=True)
        self.engine.commit_prepared(txn, m.int_field(msg, "ts"))
        self.counts["committed"] += 1
        self.twopc["committed"] += 1
        self.unblocked = True
        return m.ok(msg["rid"])

    def handle_abort_prepared(self, peer, msg, received):
        txn = m.int_field(msg, "txn")
        if self.read_only_reason and txn in self.engine.prepared_txns:
            raise Unavailable(self.read_only_reason, read_only=True)
        self.engine.abort_prepared(txn)
        self.twopc["aborted"] += 1
        self.unblocked = True
        return m.ok(msg["rid"])

    def handle_txns(self, peer, msg, received):
        """The hot path: many txn steps in one message (messages.py `txns`), run in order
        with one result each; one failing item never stops the others."""
        engine = self.engine
        counts, twopc = self.counts, self.twopc
        results = []
        append = results.append
        durable = 0
        refused = self.writes_refused
        for item in msg["items"]:
            try:
                kind = item[0]
                if refused and self.refuses_item(item):
                    append({"code": "unavailable", "message": refused, "retryable": True})
                    continue
                if kind == m.ITEM_COMMIT:
                    engine.commit(item[1], item[2], item[3])
                    counts["committed"] += 1
                    durable += 1
                elif kind == m.ITEM_PREPARE:
                    engine.prepare(item[1], item[1], item[2], item[3], item[4])
                    twopc["prepared"] += 1
                    durable += 1
                elif kind == m.ITEM_COMMIT_PREPARED:
                    engine.commit_prepared(item[1], item[2])
                    counts["committed"] += 1
                    twopc["committed"] += 1
                    self.unblocked = True
                elif kind == m.ITEM_ABORT_PREPARED:
                    engine.abort_prepared(item[1])
                    twopc["aborted"] += 1
                    self.unblocked = True
                else:
                    raise BadRequest(f"unknown txns item kind {kind!r}")
                append(None)
            except Conflict as exc:
                counts["conflict"] += 1
                append({"code": "conflict", "message": "read versions changed or key locked",
                        "retryable": True, "keys": list(exc.keys)})
            except BadRequest as exc:
                append({"code": "bad_request", "message": str(exc), "retryable": False})
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                append({"code": "bad_request", "message": f"malformed txns item: {exc!r}",
                        "retryable": False})
            except StorageWriteError:
                raise
            except Exception as exc:  # a bug: answer it, never crash the shard
                counts["error"] += 1
                append({"code": "internal", "message": f"{type(exc).__name__}: {exc}",
                        "retryable": False})
        if durable:
            self.durable_waits.append((received, durable))
        return m.ok(msg["rid"], results=results)

    def refuses_item(self, item) -> bool:
        """While writes are refused: whether this `txns` item is one of them. A commit that
        writes and a prepare are; a commit_prepared or abort_prepared only when the
        database is read-only and the step would change this shard (low on space they
        still run: a prepared txn holds its keys until it is decided here)."""
        kind = item[0]
        if kind == m.ITEM_COMMIT:
            return bool(item[3])
        if kind == m.ITEM_PREPARE:
            return True
        if self.read_only_reason is None:
            return False
        if kind == m.ITEM_COMMIT_PREPARED:
            return item[1] not in self.engine.outcomes
        return item[1] in self.engine.prepared_txns

    def handle_recover_info(self, peer, msg, received):
        prepared = [dict(p) for p in self.engine.prepared()]
        txns = msg.get("txns")
        if txns is None:
            txns = [p["txn"] for p in prepared]
        outcomes = {}
        for txn in txns:
            txn = m.wire_int(txn, "txns item")
            ts = self.engine.outcome(txn)
            if ts is not None:
                outcomes[txn] = ts
        return m.ok(msg["rid"], prepared=prepared, outcomes=outcomes)

    def handle_forget(self, peer, msg, received):
        # "all": the router has just resolved every in-doubt txn on every shard, so no
        # outcome record can still be needed (records left by a router that died between
        # the last commit ack and its forget would otherwise stay forever).
        txns = self.engine.outcome_txns() if msg.get("all") else msg["txns"]
        txns = [m.wire_int(t, "txns item") for t in txns]
        if self.read_only_reason and any(t in self.engine.outcomes for t in txns):
            raise Unavailable(self.read_only_reason, read_only=True)
        self.engine.forget(txns)
        return m.ok(msg["rid"])

    def handle_block(self, peer, msg, received):
        height = m.int_field(msg, "height")
        current = self.engine.stats().get("block_height", 0)
        if height != current:  # equal = a retry after a partial failure elsewhere: idempotent
            if self.writes_refused:
                raise Unavailable(self.writes_refused)
            self.engine.set_block(height)
        rid = msg["rid"]
        if (self.flush_job is None and not self.writes_refused
                and self.engine.should_flush(time.monotonic())):
            self.start_flush()
            self.flush_job["waiters"].append((peer, rid, lambda res: m.ok(rid, flushed=True)))
            return None
        return m.ok(rid, flushed=False)

    def handle_flush(self, peer, msg, received):
        # The router sends this behind a commit barrier: freeze now so the cut is this point.
        self.finish_flush()
        self.start_flush()
        rid = msg["rid"]
        self.flush_job["waiters"].append((peer, rid, lambda res: m.ok(rid, **res)))
        return None

    def handle_prune(self, peer, msg, received):
        keep = msg.get("keep_versions")
        keep = self.keep_versions if keep is None else m.int_field(msg, "keep_versions")
        if keep < 1:
            raise BadRequest("keep_versions must be >= 1")
        if self.prune_job is None:
            self.start_prune(keep)
        rid = msg["rid"]
        waiter = (peer, rid, lambda removed: m.ok(rid, versions_removed=removed))
        if self.prune_job["keep"] == keep:
            self.prune_job["waiters"].append(waiter)
        else:
            # Another keep than the running prune's (an auto-prune, another client's): it
            # runs after that one. Joining it answered ok without applying keep_versions.
            self.prune_queue.append((keep, waiter))
        return None

    def handle_checkpoint(self, peer, msg, received):
        result = self.engine.create_checkpoint(msg["dir"], m.int_field(msg, "ts"))
        return m.ok(msg["rid"], bytes=int(result.get("bytes", 0)))

    def handle_stats(self, peer, msg, received):
        return m.ok(msg["rid"], **self.snapshot())

    # -- disk full

    @property
    def writes_refused(self) -> str | None:
        """Why this shard takes no writes now (read-only, or low on space), else None."""
        return self.read_only_reason or (self.guard.reason if self.guard.low else None)

    def check_disk(self) -> None:
        """Measure the free space; log when the shard starts or stops refusing writes."""
        turned = self.guard.check()
        if turned:
            sys.stderr.write(turned + "\n")

    def reopen_for_writes(self, now: float) -> None:
        """Read-only -> read-write, once the free space covers what the open writes
        (reopen_needs). Reads waiting on a prepared key are answered `unavailable` (their
        pins belong to the engine closed here). The state is the same before and after
        (both are what the disk holds), so the incarnation stays."""
        if free_bytes(self.path) < self.reopen_needs():
            self.next_reopen = now + REOPEN_BACKOFF_SECS[0]
            self.read_only_reason = self.read_only_message(self.read_only_cause)   # figures of now
            return
        for d in self.deferred:
            self.reply(d.peer, m.error(d.msg.get("rid"), "unavailable", "shard reopening its database", True))
        self.deferred = []
        self.send_replies()
        self.engine.close()
        self.engine = None
        self.engine = self.open_engine()
        if self.read_only_reason:
            self.next_reopen = now + self.reopen_backoff
            self.reopen_backoff = min(self.reopen_backoff * 2, REOPEN_BACKOFF_SECS[1])
            sys.stderr.write(f"shard {self.shard}: still read-only; next try in {self.reopen_backoff:.0f}s\n")
            return
        self.reopen_backoff = REOPEN_BACKOFF_SECS[0]
        sys.stderr.write(f"shard {self.shard}: database reopened for writing: taking writes again\n")

    def storage_failed(self, exc: StorageWriteError):
        """A write to the database failed (disk full, or an I/O error). RocksDB refuses every
        write from now until the database is reopened, and this pass's changes (made in
        memory at call time) cannot be made durable: every reply of the pass says
        `unavailable` instead of what it said, since none of it is acknowledged (with a
        full disk none of it reached the log: a txn's outcome is `aborted`; after another
        I/O error it may have, so `unknown`), and so are the requests that wait here
        (deferred reads, flushes, prunes) and those already sent but not yet read. Then
        the process exits (EXIT_STORAGE) for the supervisor to start the shard again from
        what is on disk; on a full disk that one opens read-only (open_engine)."""
        lost = not exc.no_space
        why = (f"shard {self.shard}: a write to its disk failed ({exc}); "
               + ("nothing of this request was applied" if not lost else "its outcome is unknown")
               + "; the shard restarts from its disk")
        waiting = [(peer, reply.get("rid")) for peer, replies in self.out.items() for reply in replies]
        waiting += [(d.peer, d.msg.get("rid")) for d in self.deferred]
        for job in (self.flush_job, self.prune_job):
            if job is not None:
                waiting += [(peer, rid) for peer, rid, _ in job["waiters"]]
        waiting += [(peer, rid) for _, (peer, rid, _) in self.prune_queue]
        self.out.clear()
        for peer, rid in waiting:
            self.reply(peer, m.error(rid, "unavailable", why, True, lost=lost))
        not_run = f"shard {self.shard}: not run: a write to its disk failed ({exc}); the shard restarts"
        for peer in list(self.peers.values()):     # sent, not read: surely not applied
            if not peer.backlogged:
                for frame in peer.read_frames():
                    self.answer_unread(peer, frame, not_run)
        self.send_replies()
        deadline = time.monotonic() + LAST_REPLIES_SECS
        for peer in list(self.peers.values()):
            writable = select.poll()
            writable.register(peer.fd, select.POLLOUT)
            while peer.outbuf and not peer.closed and time.monotonic() < deadline:
                writable.poll(max(1, int((deadline - time.monotonic()) * 1000)))
                peer.flush_out()
        sys.stderr.write(f"shard {self.shard}: a write to its disk failed: {exc}; "
                         f"{len(waiting)} request(s) answered unavailable, not acknowledged; "
                         f"exiting to restart from what is on disk\n")
        sys.stderr.flush()
        hard_exit(EXIT_STORAGE)

    def answer_unread(self, peer, frame: bytes, why: str) -> None:
        try:
            msg = m.unpack(frame)
        except Exception:
            return
        msgs = msg.get("msgs") if isinstance(msg, dict) and msg.get("op") == m.MULTI else [msg]
        for sub in msgs if isinstance(msgs, list) else ():
            if isinstance(sub, dict) and "rid" in sub:
                self.reply(peer, m.error(sub["rid"], "unavailable", why, True))

    # -- deferred reads

    def defer(self, peer, msg, received, wait: float | None = None,
              late: str = "read waited too long on a prepared transaction"):
        at = m.int_field(msg, "at")
        pin = self.engine.pin(at)
        wait = self.read_wait if wait is None else wait
        self.deferred.append(Deferred(peer, msg, received + wait, at if pin is None else pin, late))
        return None

    def retry_deferred(self, now: float) -> None:
        if not self.unblocked and all(d.deadline > now for d in self.deferred):
            return
        self.unblocked = False
        waiting = self.deferred
        self.deferred = []
        for d in waiting:
            before = len(self.deferred)
            if d.deadline <= now:
                self.reply(d.peer, m.error(d.msg.get("rid"), "unavailable", d.late, True))
            else:
                self.dispatch_retry(d)
            if len(self.deferred) == before:  # answered (not deferred again): release the pin
                self.engine.unpin(d.pin)

    def dispatch_retry(self, d: Deferred) -> None:
        """Run a deferred read again: its answer, or deferred once more if still blocked.
        Errors map as in dispatch (a malformed read deferred before the engine saw its
        bad key is still `bad_request`); a read without a rid is answered with rid None."""
        handler = self.handle_read if d.msg.get("op") == m.READ else self.handle_scan
        try:
            # retry=True: still blocked raises Blocked instead of deferring it anew, so
            # it keeps its deadline and pin
            result = handler(d.peer, d.msg, 0.0, retry=True)
        except Blocked:
            self.deferred.append(d)
        except ScanContinues:
            if d.late != SCAN_LATE:
                # a scan deferred on a prepared key, now going on in slices: a scan's
                # deadline from here, not what was left of the read wait
                d.deadline, d.late = time.monotonic() + SCAN_DEADLINE_SECS, SCAN_LATE
            self.deferred.append(d)
        except StorageWriteError:
            raise
        except Exception as exc:
            self.reply(d.peer, self.error_reply(d.msg.get("rid"), d.msg.get("op"), exc))
        else:
            self.reply(d.peer, result)

    # -- maintenance: incremental flush and prune, one step per pass

    def start_flush(self) -> None:
        self.flush_job = {"before": dict(self.engine.stats().get("flush", {})), "waiters": []}
        self.engine.start_flush()

    def finish_flush(self) -> None:
        """Complete a running flush now (blocking: shutdown, or a flush op's new cut)."""
        if self.flush_job is not None:
            self.engine.finish_flush()              # waits for RocksDB instead of polling
        while self.flush_job is not None:
            self.step_flush()

    def step_flush(self) -> None:
        if not self.engine.flush_step():
            return
        job, self.flush_job = self.flush_job, None
        after = self.engine.stats().get("flush", {})
        before = job["before"]
        result = {"flush_ts": after.get("last_flush_ts", 0),
                  "keys": after.get("keys_flushed", 0) - before.get("keys_flushed", 0),
                  "bytes": after.get("bytes_flushed", 0) - before.get("bytes_flushed", 0)}
        for peer, _rid, build in job["waiters"]:
            self.reply(peer, build(result))

    def start_prune(self, keep: int) -> None:
        before = self.engine.stats().get("prune", {}).get("versions_removed", 0)
        self.prune_job = {"before": before, "waiters": [], "keep": keep}
        self.engine.start_prune(keep)
        self.last_prune = time.monotonic()

    def step_prune(self) -> None:
        if not self.engine.prune_step():
            return
        job, self.prune_job = self.prune_job, None
        removed = self.engine.stats().get("prune", {}).get("versions_removed", 0) - job["before"]
        self.unblocked = True  # the horizon moved: deferred reads may now be too old
        for peer, _rid, build in job["waiters"]:
            self.reply(peer, build(removed))
        if self.prune_queue:      # the next keep asked for, with every request asking it
            keep = self.prune_queue[0][0]
            self.start_prune(keep)
            self.prune_job["waiters"] = [w for k, w in self.prune_queue if k == keep]
            self.prune_queue = [(k, w) for k, w in self.prune_queue if k != keep]

    def maintenance_step(self) -> None:
        """One slice of background work per pass: freeing the last flushed memtable, else
        a flush chunk (or a look at whether RocksDB has written its SST), else a prune chunk."""
        if self.engine.released:
            self.engine.release_step()
        elif self.flush_job is not None:
            self.step_flush()
        elif self.prune_job is not None:
            self.step_prune()

    @property
    def background_pending(self) -> bool:
        """A memtable to free, or a flush or prune job running (maintenance_step's work)."""
        return bool(self.engine.released) or self.flush_job is not None or self.prune_job is not None

    def poll_timeout_ms(self) -> int:
        """Do not sleep while background work has a next slice; while a flush only waits
        for RocksDB's background threads, look again soon without spinning a core."""
        if self.unblocked and self.deferred:
            return 0                # a scan goes on (or a prepared txn ended): no sleep
        if not self.background_pending:
            return POLL_MS
        engine = self.engine
        # maintenance_step frees before it steps a flush, and steps a flush before a prune
        wait = FLUSH_WAIT_POLL_MS if not engine.released and engine.flush_waiting else 0
        paced = self.maintenance_after - time.monotonic()
        return max(wait, math.ceil(paced * 1000)) if paced > 0 else wait

    def run_timers(self, now: float) -> None:
        if now < self.next_stats:
            return
        self.next_stats = now + min(self.stats_interval, 0.25)
        if self.malloc_trim is not None and now >= self.next_trim:
            self.next_trim = now + MALLOC_TRIM_SECS
            self.malloc_trim(0)
        if os.getppid() != self.parent:
            self.stopping = True            # the supervisor died
        if self.read_only_reason and now >= self.next_reopen:
            self.reopen_for_writes(now)     # once the disk looks roomy enough
        refused = self.writes_refused       # no auto-flush or auto-prune: both write
        if self.flush_job is None and not refused and self.engine.should_flush(time.monotonic()):
            self.start_flush()
        if (self.prune_job is None and self.auto_prune_secs > 0 and not refused
                and now - self.last_prune >= self.auto_prune_secs):
            self.start_prune(self.keep_versions)
        self.tps_samples.append((now, self.counts["committed"]))
        while len(self.tps_samples) > 2 and now - self.tps_samples[0][0] > TPS_WINDOW_SECS:
            self.tps_samples.popleft()
        if now >= getattr(self, "next_push", 0.0):
            self.next_push = now + self.stats_interval
            self.status.send("stats", snapshot=self.snapshot())

    # -- stats

    def tps(self) -> float:
        if len(self.tps_samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.tps_samples[0], self.tps_samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> dict:
        st = dict(self.engine.stats())
        lat = self.latency.snapshot()
        st.update({
            "role": "shard", "shard": self.shard, "pid": os.getpid(), "inc": self.inc,
            "ts": time.time(), "txn": dict(self.counts), "twopc": dict(self.twopc),
            "commit_latency": lat, "tps": self.tps(),
            "latency_p50_ms": quantile(lat, 0.50) * 1000,
            "latency_p90_ms": quantile(lat, 0.90) * 1000,
            "latency_p99_ms": quantile(lat, 0.99) * 1000,
            "deferred_reads": len(self.deferred),
            "disk": {"free_bytes": self.guard.free, "min_free_bytes": self.guard.min_free,
                     "writes": ("read_only" if self.read_only_reason
                                else "low_space" if self.guard.low else "ok"),
                     "writes_refused": int(self.writes_refused is not None),
                     "read_only": int(self.read_only_reason is not None),
                     "refused": self.writes_refused or ""},
            "peers": len(self.peers),
            "peers_backlogged": sum(1 for p in self.peers.values() if p.backlogged),
        })
        return st


def main(argv=None) -> int:
    spec = parse_spec(argv)
    set_parent_death_signal()
    return ShardWorker(spec).run()


if __name__ == "__main__":
    sys.exit(main())
