"""Router: the client ROUTER socket, one Unix-socket stream per shard (shard/link.py), the
ts oracle, 2PC, the barrier.

    python -m node.router --spec '{"role": "router", "shards": 2, "data_dir": ...,
                                   "run_dir": ..., "config": {...}}'

Single-threaded and asynchronous: every request becomes messages appended to per-shard
outboxes plus callbacks keyed by `rid`; at the end of each loop pass every outbox goes
out as one frame (a `multi` when it holds several messages), so a slow shard never
blocks the others and any number of client requests may be in flight.

Key placement: shard = zlib.crc32(key) % shards (stable across processes and versions).

Ordering invariant (DESIGN.md): a message carrying ts T is appended to the outboxes of all
its shards when T is allocated, and outboxes are sent in append order, so every shard
sees messages in allocation order. Reads use S = last allocated ts.

2PC: txn id = its ts T (unique, never reused). prepare(T) to all participants; all ok ->
commit_prepared to all, and the reply goes out at that decision: every participant holds
T prepared durably, so the recovery rule can only commit it. An abort that every
participant may have prepared (a prepare result lost, a participant restarted) is answered
at the first abort_prepared ack instead. Forget once every participant acked the commit.
Recovery (router start, or a shard with a new incarnation or back from silence): a prepared
txn commits iff some participant has an outcome record for it or every participant holds it
prepared, else it is aborted; a shard gets no other message until its prepared txns are
resolved.
"""
import collections
import json
import os
import shutil
import sys
import time
import zlib

import zmq

from node.protocol import Limits, ProtocolError, decode_request, encode_error, encode_reply
from node.routing import group_keys, parts_by_shard, route_batch, shard_of  # noqa: F401 (re-exported)
from node.security import secure_client_socket
from node.timestamps import TimestampOracle
from shard import messages as m
from shard.busypoll import BusyPoller, busy_poll_secs
from shard.histogram import Histogram, RateWindow, summary_ms
from shard.keycodec import prefix_end
from shard.link import POLLOUT, connect
from shard.worker import (EXIT_FATAL, ProcessProfile, SignalPipe, SupervisorLink, parse_spec,
                          set_parent_death_signal, tune_gc)

MAX_DRAIN = 1024        # client frames taken per loop pass
STOP_DRAIN = 100_000    # at most this many queued frames are still taken on at a stop
STOP_QUIET_SECS = 0.2   # at a stop, keep refusing new frames until none came for this long
POLL_MS = 20
MAX_FORGETS = 4096      # outcome records to forget that get a frame of their own


def err(code: str, message: str, retryable: bool = False, **extra) -> dict:
    return {"code": code, "message": message, "retryable": retryable, **extra}


def unavailable(message: str, **extra) -> dict:
    return err("unavailable", message, True, **extra)


def socket_frame_cap(max_frame_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE for the client socket: 4x the protocol's frame limit (64 MiB by
    default), so frames over the limit still reach the parser and get `too_large`."""
    return 4 * max_frame_bytes


class ShardLink:
    """The router's view of one shard: connection, incarnation, state, unsent messages."""

    def __init__(self, index: int, path: str):
        self.index = index
        self.path = path           # the shard's Unix socket (shard/link.py)
        self.conn = None           # FrameStream while connected, else None
        self.inc = None
        self.state = "down"        # down -> resolving -> up
        self.last_pong = time.monotonic()
        self.outbox = []
        self.group = None          # the open `txns` message at the end of outbox, if any
        self.forgets = []          # txns to forget, sent as one message per loop pass
        self.pending = set()       # rids in flight at this shard
        self.max_ts = 0
        self.block = 0
        self.pid = None


class TxnGroup:
    """One `txns` message to a shard: its items and, per item, what to tell on the result:
    (KIND_COMMIT, owner, index, ts) | (KIND_PREPARE, TwoPC) | (KIND_COMMIT_PREPARED, TwoPC,
    shard) | (KIND_ABORT, TwoPC)."""
    __slots__ = ("items", "targets")

    def __init__(self):
        self.items = []
        self.targets = []


KIND_COMMIT, KIND_PREPARE, KIND_COMMIT_PREPARED, KIND_ABORT = range(4)

# Shard error codes that say a prepare did not take effect: a refusal the shard answered,
# or a message for another incarnation (never executed). Any other failure (a lost reply,
# a timeout, an internal error) leaves the participant possibly prepared.
NOT_PREPARED = frozenset(("conflict", "bad_request", m.STALE_INC))


class TwoPC:
    """A cross-shard txn from prepare until every participant applied the decision.
    The requester is `owner` (a Request for `txn`, a BatchRun for `batch`) entry `index`."""
    __slots__ = ("ts", "participants", "owner", "index", "decision", "unacked",
                 "waiting", "conflict_keys", "failure", "refused", "acks_waiting", "any_ack",
                 "abort_error", "run")

    def __init__(self, ts, participants, owner, index):
        self.ts = ts
        self.participants = participants
        self.owner = owner
        self.index = index
        self.decision = None           # None (undecided) | "commit" | "abort"
        self.unacked = set()           # participants that have not acked commit_prepared
        self.waiting = len(participants)   # prepare results still to come
        self.conflict_keys = []
        self.failure = None
        self.refused = False           # some participant certainly did not prepare it
        self.acks_waiting = 0          # abort_prepared results still to come
        self.any_ack = False           # an abort_prepared succeeded somewhere
        self.abort_error = None        # the client's error, sent at the first abort ack
        self.run = None                # the BatchRun that holds this txn's keys locked


class Request:
    __slots__ = ("envelope", "id", "op", "t0")

    def __init__(self, envelope, id, op, t0):
        self.envelope, self.id, self.op, self.t0 = envelope, id, op, t0


class BatchRun:
    """A `batch` request being dispatched entry by entry (the owner of its entries)."""
    __slots__ = ("req", "txns", "count", "results", "next", "finished", "undecided", "locked",
                 "routes")

    def __init__(self, req, txns, track_keys: bool = True, routes=None):
        self.req = req
        self.txns = txns
        self.count = len(txns)
        self.results = [None] * len(txns)
        self.next = 0
        self.finished = 0
        self.undecided = {}            # TwoPC -> keys of an entry still undecided
        # key -> undecided entries touching it; None when no key is in two entries
        self.locked = collections.Counter() if track_keys else None
        # per entry: its shard, or {shard: (reads, writes)} (node/routing.route_batch);
        # only for a batch in which no key is in two entries (dispatch_unshared)
        self.routes = routes


class Router:
    def __init__(self, spec: dict):
        self.config = spec["config"]
        self.nshards = int(spec["shards"])
        self.data_dir = spec["data_dir"]
        self.run_dir = spec["run_dir"]
        node = self.config.get("node", {})
        self.listen = spec.get("listen") or node.get("listen", "tcp://127.0.0.1:7450")
        rc = self.config.get("router", {})
        self.request_timeout = float(rc.get("request_timeout_secs", 5.0))
        self.ping_interval = float(rc.get("ping_interval_secs", 0.2))
        self.shard_timeout = float(rc.get("shard_timeout_secs", 2.0))
        self.stats_interval = float(self.config.get("supervisor", {}).get("stats_interval_secs", 0.5))
        self.keep_versions = int(self.config.get("prune", {}).get("keep_versions", 3))
        self.limits = Limits.from_dict(self.config.get("limits", {}))
        self.max_frame = int(self.config.get("limits", {}).get("max_frame_bytes", 16 << 20))
        self.oracle = TimestampOracle(os.path.join(self.data_dir, "timestamp"))
        self.ctx = zmq.Context.instance()
        self.parent = os.getppid()
        self.ready = False
        self.stopping = False
        self.auth = None               # CURVE authenticator thread, when keys are configured
        self.last_client_frame = 0.0   # monotonic time of the last client frame taken
        self.links = []
        self.pending = {}              # rid -> (link, callback, deadline), in send order
        self.next_rid = 1
        self.txns = {}                 # ts -> TwoPC not yet finished
        self.undecided = 0             # 2PC txns prepared but not decided
        self.barriers = collections.deque()   # callbacks(S) waiting for no undecided 2PC
        self.held = []                 # 2PC starts held back by a barrier
        self.recovered_commits = set() # txns committed by recovery: forget once all shards up
        self.block_height = 0
        self.creating_checkpoints: set[str] = set()   # names whose create has not answered yet
        self.inflight = 0
        self.next_ping = 0.0
        self.next_stats = 0.0
        # metrics
        self.req_hist = {}
        self.results = collections.Counter()
        self.twopc = collections.Counter()
        # node-level transaction figures for `stats` (txn requests and batch entries alike)
        self.txn_outcomes = collections.Counter()
        self.committed_rate = RateWindow()

    # ------------------------------------------------------------ lifecycle

    def boot(self) -> None:
        self.status = SupervisorLink(self.ctx, self.run_dir, "router")
        try:
            self.client = self.ctx.socket(zmq.ROUTER)
            self.client.setsockopt(zmq.LINGER, 0)
            # ZeroMQ drops (and disconnects) a frame over MAXMSGSIZE without a word, so the
            # socket cap sits well above the protocol limit: a frame a little too large is
            # read and answered `too_large`; only an absurd one is refused by ZeroMQ itself.
            self.client.setsockopt(zmq.MAXMSGSIZE, socket_frame_cap(self.max_frame))
            self.auth = secure_client_socket(self.ctx, self.client, self.config, self.listen)
            self.client.setsockopt(zmq.SNDHWM, 100_000)
            self.client.setsockopt(zmq.RCVHWM, 100_000)
            self.client.bind(self.listen)
        except Exception as exc:
            sys.stderr.write(f"router: cannot boot: {exc}\n")
            self.status.fatal(f"router: {type(exc).__name__}: {exc}")
            sys.exit(EXIT_FATAL)
        self.signals = SignalPipe()
        self.poller = zmq.Poller()
        self.waiter = BusyPoller(self.poller, busy_poll_secs(self.config))
        self.poller.register(self.signals.r, zmq.POLLIN)
        for i in range(self.nshards):
            link = ShardLink(i, os.path.join(self.run_dir, f"shard-{i}.sock"))
            self.links.append(link)
            self.connect_link(link)

    def run(self) -> int:
        with ProcessProfile("router"):
            return self.run_loop()

    def run_loop(self) -> int:
        self.boot()
        tune_gc()
        grace_deadline = None
        while True:
            self.loop_pass()
            if self.stopping:
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + self.request_timeout + 1
                    if self.ready:
                        # Requests already queued on the socket were sent before the stop:
                        # they are in flight and get finished like the rest. Later ones are
                        # refused with `unavailable` (see loop_pass), never left unanswered.
                        self.drain_clients(STOP_DRAIN)
                        self.flush_outboxes()
                now = time.monotonic()
                # Exit once nothing is in flight AND clients have gone quiet: a frame still
                # on its way when the socket closes would get no answer at all.
                if now > grace_deadline or (self.inflight == 0
                                            and now - self.last_client_frame > STOP_QUIET_SECS):
                    break
        self.flush_outboxes()
        for link in self.links:
            if link.conn is not None:
                link.conn.close()
        self.client.close()
        if self.auth is not None:
            self.auth.stop()
        self.status.close()
        return 0

    def loop_pass(self) -> None:
        events = self.waiter.poll(POLL_MS)
        if self.signals.r in events:
            for _ in self.signals.drain():
                self.stopping = True
        for link in self.links:
            if link.conn is not None and link.conn.fd in events:
                self.drain_shard(link, events[link.conn.fd])
        if self.ready and self.client in events:
            if self.stopping:
                self.refuse_clients()
            else:
                self.drain_clients()
        now = time.monotonic()
        self.run_timers(now)
        self.flush_outboxes()

    def become_ready(self) -> None:
        # Every shard is up and every in-doubt txn resolved: no outcome record is needed.
        for link in self.links:
            self.send(link, {"op": m.FORGET, "all": True}, lambda reply: None)
        self.ready = True
        self.poller.register(self.client, zmq.POLLIN)
        self.status.send("ready")

    # ------------------------------------------------------------ shard messaging

    def send(self, link: ShardLink, msg: dict, callback) -> None:
        rid = self.next_rid
        self.next_rid += 1
        msg["rid"] = rid
        msg["inc"] = link.inc
        link.outbox.append(msg)
        link.group = None          # later txn items go after this message (ts order)
        link.pending.add(rid)
        self.pending[rid] = (link, callback, time.monotonic() + self.request_timeout)

    def send_item(self, link: ShardLink, item: list, target: tuple) -> None:
        """Append one txn step to the shard's open `txns` message (opening one when the
        outbox does not end with it, so the shard still sees everything in send order)."""
        group = link.group or self.open_group(link)
        group.items.append(item)
        group.targets.append(target)

    def open_group(self, link: ShardLink) -> TxnGroup:
        group = link.group = TxnGroup()
        rid = self.next_rid
        self.next_rid += 1
        link.outbox.append({"op": m.TXNS, "rid": rid, "inc": link.inc, "items": group.items})
        link.pending.add(rid)
        self.pending[rid] = (link, lambda reply, group=group: self.on_group(group, reply),
                             time.monotonic() + self.request_timeout)
        return group

    def on_group(self, group: TxnGroup, reply: dict) -> None:
        """Hand each item's result of a `txns` reply to its txn (the whole message's
        error to every item when it failed as a whole)."""
        targets = group.targets
        results = reply.get("results") if reply.get("ok") else None
        if type(results) is not list or len(results) != len(targets):
            failure = reply.get("error") if not reply.get("ok") else None
            if not isinstance(failure, dict):
                failure = {"code": "internal", "message": "malformed txns reply from shard",
                           "retryable": False}
            results = [failure] * len(targets)
        entry_done = self.entry_done
        for target, e in zip(targets, results):
            try:
                kind = target[0]
                if kind == KIND_COMMIT:
                    _, owner, index, ts = target
                    if e is None:
                        entry_done(owner, index, {"ok": True, "commit_ts": ts})
                    else:
                        entry_done(owner, index, {"ok": False, "error": self.txn_error_of(e)})
                elif kind == KIND_PREPARE:
                    txn = target[1]
                    if e is None and txn.waiting > 1:
                        txn.waiting -= 1     # more prepare results to come
                    else:
                        self.on_prepared(txn, e)
                elif kind == KIND_COMMIT_PREPARED:
                    self.on_commit_ack(target[1], target[2], e)
                elif kind == KIND_ABORT:
                    self.on_abort_ack(target[1], e)
            except Exception as exc:  # a bug in one txn's continuation must not stop the rest
                sys.stderr.write(f"router: txn result error: {type(exc).__name__}: {exc}\n")

    def scatter(self, msgs: dict, done) -> None:
        """Send msgs {shard: msg}; done({shard: reply}) once every shard answered or failed."""
        replies = {}
        want = len(msgs)

        def collect(reply, s):
            replies[s] = reply
            if len(replies) == want:
                done(replies)
        for s, msg in msgs.items():
            self.send(self.links[s], msg, lambda reply, s=s: collect(reply, s))

    def flush_outboxes(self) -> None:
        for link in self.links:
            # Forgets ride along with other traffic (at the latest with the next ping):
            # a frame of its own would cost the shard a whole loop pass and sync.
            if link.forgets and (link.outbox or len(link.forgets) >= MAX_FORGETS):
                txns, link.forgets = link.forgets, []
                if link.state in ("up", "resolving"):
                    self.send(link, {"op": m.FORGET, "txns": txns}, lambda reply: None)
            link.group = None
            if not link.outbox:
                continue
            box, link.outbox = link.outbox, []
            frame = m.pack(box[0] if len(box) == 1 else {"op": m.MULTI, "msgs": box})
            conn = link.conn
            if conn is not None and conn.send(frame):
                conn.sync_poller(self.poller)
                continue
            if conn is not None:
                self.drop_conn(link)
            for msg in box:   # not connected: never sent, so not executed; fail them now
                self.complete(msg["rid"], m.error(msg["rid"], m.STALE_INC, "shard not connected", True))

    def connect_link(self, link: ShardLink) -> None:
        """Connect to the shard's socket if it listens (at boot, then with every ping)."""
        try:
            link.conn = connect(link.path)
        except OSError as exc:
            sys.stderr.write(f"router: cannot connect to shard {link.index}: {exc}\n")
            link.conn = None
        if link.conn is not None:
            link.conn.sync_poller(self.poller)

    def drop_conn(self, link: ShardLink) -> None:
        """The connection ended (the shard process exited or was killed): nothing pending
        there can be answered any more, so fail it now instead of at the timeout."""
        conn, link.conn = link.conn, None
        conn.close()
        if link.pending or link.outbox:
            self.fail_link(link, f"shard {link.index} connection closed")

    def drain_shard(self, link: ShardLink, flags: int) -> None:
        conn = link.conn
        if flags & POLLOUT:
            conn.flush_out()
        for frame in conn.read_frames():
            try:
                replies = m.replies_of(m.unpack(frame))
            except Exception:
                continue
            for reply in replies:
                if isinstance(reply, dict):
                    self.complete(reply.get("rid"), reply)
        if conn.closed:
            self.drop_conn(link)
        else:
            conn.sync_poller(self.poller)

    def complete(self, rid, reply: dict) -> None:
        entry = self.pending.pop(rid, None)
        if entry is None:
            return  # late reply for a request already failed
        link, callback, _ = entry
        link.pending.discard(rid)
        try:
            callback(reply)
        except Exception as exc:  # a bug in a callback must not take the router down
            sys.stderr.write(f"router: callback error: {type(exc).__name__}: {exc}\n")

    def fail_link(self, link: ShardLink, why: str) -> None:
        """The shard died, restarted or went silent: fail everything pending there."""
        link.state = "down"
        unsent, link.outbox = link.outbox, []
        link.group = None
        for msg in unsent:        # never sent: not executed
            self.complete(msg["rid"], m.error(msg["rid"], m.STALE_INC, why, True))
        for rid in list(link.pending):
            self.complete(rid, m.error(rid, "unavailable", why, True, lost=True))

    def run_timers(self, now: float) -> None:
        # request timeouts: every request has the same timeout, so pending is in deadline order
        while self.pending:
            rid = next(iter(self.pending))
            if self.pending[rid][2] > now:
                break
            self.complete(rid, m.error(rid, "unavailable", "shard did not answer in time", True, lost=True))
        if now >= self.next_ping:
            self.next_ping = now + self.ping_interval
            for link in self.links:
                if link.inc is not None and link.state != "down" and now - link.last_pong > self.shard_timeout:
                    self.fail_link(link, f"shard {link.index} did not answer pings")
                if link.conn is None:
                    self.connect_link(link)
                self.send(link, {"op": m.PING}, lambda reply, link=link: self.on_pong(link, reply))
            if os.getppid() != self.parent:
                self.stopping = True
        if now >= self.next_stats:
            self.next_stats = now + self.stats_interval
            self.status.send("stats", snapshot=self.snapshot())

    def on_pong(self, link: ShardLink, reply: dict) -> None:
        if not reply.get("ok"):
            return
        link.last_pong = time.monotonic()
        link.max_ts = max(link.max_ts, int(reply.get("max_ts", 0)))
        link.block = int(reply.get("block", 0))
        link.pid = reply.get("pid")
        if reply["inc"] != link.inc:
            if link.inc is not None:
                self.fail_link(link, f"shard {link.index} restarted")
            link.inc = reply["inc"]
            link.state = "down"
        if link.state == "down":
            if not self.ready and any(l.inc is None for l in self.links):
                return  # at boot: first learn every shard's max_ts
            if not self.ready and self.oracle.last == 0:
                self.oracle.start(max(l.max_ts for l in self.links))
                self.block_height = max(l.block for l in self.links)
            self.resolve(link)

    # ------------------------------------------------------------ recovery

    def resolve(self, link: ShardLink) -> None:
        """Resolve the shard's prepared txns, then mark it up (DESIGN.md recovery rule)."""
        link.state = "resolving"

        def on_info(reply):
            if not reply.get("ok"):
                link.state = "down"   # retried on the next pong
                return
            prepared = {int(p["txn"]): p for p in reply.get("prepared", [])}
            unknown = {}
            for txn, p in prepared.items():
                known = self.txns.get(txn)
                if known is not None:
                    if known.decision is None:
                        self.decide(known, False, unavailable(f"shard {link.index} restarted", outcome="aborted"))
                else:
                    unknown[txn] = p
            if not unknown:
                return self.apply_known(link, prepared)
            self.query_outcomes(link, prepared, unknown)
        self.send(link, {"op": m.RECOVER_INFO}, on_info)

    def query_outcomes(self, link, prepared, unknown) -> None:
        asked = set()
        for p in unknown.values():
            asked.update(int(s) for s in p.get("participants", []))
        asked.add(link.index)
        if any(self.links[s].inc is None or (self.links[s].state == "down" and s != link.index)
               for s in asked):
            link.state = "down"       # a participant is unreachable: retry on the next pong
            return
        txns = list(unknown)

        def on_outcomes(replies):
            if link.state != "resolving":
                return
            outcomes = {}
            holders = collections.defaultdict(set)    # txn -> shards holding it prepared
            for s, reply in replies.items():
                if not reply.get("ok"):
                    link.state = "down"
                    return
                for txn, ts in reply.get("outcomes", {}).items():
                    outcomes[int(txn)] = int(ts)
                for p in reply.get("prepared", []):
                    holders[int(p["txn"])].add(s)
            for txn in txns:
                p = unknown[txn]
                participants = {int(s) for s in p.get("participants", [])}
                if txn in outcomes:
                    commit_ts = outcomes[txn]
                elif participants and holders[txn] >= participants:
                    commit_ts = int(p["ts"])   # the router may have answered it committed
                else:
                    continue                   # some participant lacks it: aborted
                self.recovered_commits.add(txn)
                p["commit_ts"] = commit_ts
            self.apply_known(link, prepared)
        self.scatter({s: {"op": m.RECOVER_INFO, "txns": txns} for s in asked}, on_outcomes)

    def apply_known(self, link: ShardLink, prepared: dict) -> None:
        msgs = []
        for txn, p in prepared.items():
            known = self.txns.get(txn)
            if known is not None and known.decision == "commit":
                msgs.append((known, {"op": m.COMMIT_PREPARED, "txn": txn, "ts": known.ts}))
            elif known is None and "commit_ts" in p:
                msgs.append((None, {"op": m.COMMIT_PREPARED, "txn": txn, "ts": p["commit_ts"]}))
            else:
                msgs.append((None, {"op": m.ABORT_PREPARED, "txn": txn}))
        left = [len(msgs)]

        def one_done(reply, known):
            if not reply.get("ok"):
                link.state = "down"
                return
            if known is not None:
                self.commit_acked(known, link.index)
            left[0] -= 1
            if left[0] == 0 and link.state == "resolving":
                self.link_up(link)
        for known, msg in msgs:
            self.send(link, msg, lambda reply, known=known: one_done(reply, known))
        if not msgs:
            self.link_up(link)

    def link_up(self, link: ShardLink) -> None:
        link.state = "up"
        if all(l.state == "up" for l in self.links):
            if self.recovered_commits:   # no shard holds them prepared any more
                txns = sorted(self.recovered_commits)
                self.recovered_commits.clear()
                for l in self.links:
                    self.send(l, {"op": m.FORGET, "txns": txns}, lambda reply: None)
            if not self.ready:
                self.become_ready()

    # ------------------------------------------------------------ client side

    def client_requests(self, limit: int):
        """Yield (envelope, request, received_at) for up to `limit` frames waiting on the
        client socket. A frame that does not decode is answered here, and counted."""
        for _ in range(limit):
            try:
                frames = self.client.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            envelope, payload = frames[:-1], frames[-1]
            t0 = self.last_client_frame = time.monotonic()
            try:
                req = decode_request(payload, self.limits)
            except ProtocolError as exc:
                self.results[("invalid", exc.code)] += 1
                self.send_client(envelope, exc.reply())
                continue
            except Exception as exc:
                self.results[("invalid", "internal")] += 1
                self.send_client(envelope, encode_error(None, "internal", f"decode: {exc!r}", False))
                continue
            yield envelope, req, t0

    def refuse_clients(self) -> None:
        """While stopping: answer each new request `unavailable` (retryable, no effect)."""
        for envelope, req, _ in self.client_requests(MAX_DRAIN):
            extra = {"outcome": "aborted"} if req["op"] in ("txn", "batch") else {}
            self.results[(req["op"], "unavailable")] += 1
            self.send_client(envelope, encode_error(req.get("id"), "unavailable",
                                                    "the node is stopping", True, **extra))

    def drain_clients(self, limit: int = MAX_DRAIN) -> None:
        for envelope, req, t0 in self.client_requests(limit):
            ctx = Request(envelope, req.get("id"), req["op"], t0)
            self.inflight += 1
            try:
                getattr(self, "op_" + req["op"])(ctx, req)
            except Exception as exc:
                self.fail(ctx, err("internal", f"{type(exc).__name__}: {exc}"))

    def send_client(self, envelope, payload: bytes) -> None:
        try:
            self.client.send_multipart(envelope + [payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # client gone or not reading: ROUTER drops it

    def finish(self, ctx: Request, result: str, payload: bytes) -> None:
        if ctx.envelope is None:
            return  # already answered
        self.send_client(ctx.envelope, payload)
        ctx.envelope = None
        self.inflight -= 1
        self.results[(ctx.op, result)] += 1
        hist = self.req_hist.get(ctx.op)
        if hist is None:
            hist = self.req_hist[ctx.op] = Histogram()
        hist.observe(time.monotonic() - ctx.t0)

    def reply(self, ctx: Request, **fields) -> None:
        self.finish(ctx, "ok", encode_reply(ctx.id, **fields))

    def fail(self, ctx: Request, error: dict) -> None:
        error = dict(error)
        self.finish(ctx, error["code"], encode_error(ctx.id, error.pop("code"), error.pop("message"),
                                                     error.pop("retryable"), **error))

    def shards_up(self, shards) -> bool:
        links = self.links
        for s in shards:              # a loop, not all(<genexpr>): this runs per txn
            if links[s].state != "up":
                return False
        return True

    def all_up(self) -> bool:
        return all(l.state == "up" for l in self.links)

    @staticmethod
    def shard_error(reply: dict) -> dict:
        """A client error from a failed shard reply."""
        e = reply.get("error") or {}
        code = e.get("code")
        if code in ("conflict", "too_old", "bad_request", "not_found", "internal", "too_large"):
            return dict(e)
        return unavailable(e.get("message", "shard unavailable"))

    def snapshot_ts(self, at):
        if at is None:
            return self.oracle.last, None
        if at > self.oracle.last:
            return None, err("bad_request", f"at={at} is in the future (latest ts {self.oracle.last})")
        return at, None

    # -- ping, get, scan

    def op_ping(self, ctx, req):
        self.reply(ctx, version=1, shards=self.nshards, ts=self.oracle.last)

    def op_get(self, ctx, req):
        keys = req["keys"]
        S, error = self.snapshot_ts(req.get("at"))
        if error:
            return self.fail(ctx, error)
        groups = group_keys(keys, self.nshards)       # {shard: ([index], [key])}
        if not self.shards_up(groups):
            return self.fail(ctx, unavailable("a shard is down or restarting"))
        if not groups:
            return self.reply(ctx, ts=S, values=[], versions=[])

        def done(replies):
            values = [None] * len(keys)
            versions = [0] * len(keys)
            for s, reply in replies.items():
                if not reply.get("ok"):
                    return self.fail(ctx, self.shard_error(reply))
                for i, v, ver in zip(groups[s][0], reply["values"], reply["versions"]):
                    values[i] = v
                    versions[i] = ver
            self.reply(ctx, ts=S, values=values, versions=versions)
        self.scatter({s: {"op": m.READ, "keys": shard_keys, "at": S}
                      for s, (_, shard_keys) in groups.items()}, done)

    def op_scan(self, ctx, req):
        S, error = self.snapshot_ts(req.get("at"))
        if error:
            return self.fail(ctx, error)
        start, end, prefix = req.get("start"), req.get("end"), req.get("prefix")
        limit = int(req.get("limit") or 1000)
        if prefix:
            start = prefix if start is None else max(start, prefix)
            pend = prefix_end(prefix)
            end = pend if end is None else (end if pend is None else min(end, pend))
        if start is not None and end is not None and start >= end:
            return self.reply(ctx, ts=S, items=[], more=False)
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))

        def done(replies):
            items, more = [], False
            for reply in replies.values():
                if not reply.get("ok"):
                    return self.fail(ctx, self.shard_error(reply))
                items.extend(reply["items"])
                more = more or reply["more"]
            items.sort(key=lambda it: it[0])
            # a shard with `more` returned `limit` items, all below its unseen keys, so the
            # first `limit` merged items are exact
            more = more or len(items) > limit
            self.reply(ctx, ts=S, items=items[:limit], more=more)
        self.scatter({s: {"op": m.SCAN, "start": start, "end": end, "limit": limit, "at": S}
                      for s in range(self.nshards)}, done)

    # -- txn and batch

    def count_txn(self, result: dict) -> None:
        """One transaction's outcome, for the node row of `stats`."""
        if result["ok"]:
            self.txn_outcomes["committed"] += 1
            self.committed_rate.add(1)
        elif result["error"].get("code") == "conflict":
            self.txn_outcomes["conflict"] += 1
        else:
            self.txn_outcomes["error"] += 1

    def count_txns(self, results: list) -> None:
        """count_txn for a whole batch at once (one rate-window update)."""
        committed = conflict = 0
        for result in results:
            if result["ok"]:
                committed += 1
            elif result["error"].get("code") == "conflict":
                conflict += 1
        outcomes = self.txn_outcomes
        outcomes["committed"] += committed
        outcomes["conflict"] += conflict
        outcomes["error"] += len(results) - committed - conflict
        if committed:
            self.committed_rate.add(committed)

    def op_txn(self, ctx, req):
        self.start_txn(req, ctx, 0)

    def entry_done(self, owner, index: int, result: dict) -> None:
        """A txn finished: {"ok": True, "commit_ts"} | {"ok": False, "error"}. The owner is
        the `txn` request itself or the BatchRun holding it as entry `index`."""
        if owner.__class__ is BatchRun:
            owner.results[index] = result
            owner.finished += 1
            if owner.finished == owner.count:
                self.count_txns(owner.results)
                self.reply(owner.req, results=owner.results)
            return
        self.count_txn(result)
        if result["ok"]:
            self.reply(owner, commit_ts=result["commit_ts"])
        else:
            self.fail(owner, result["error"])

    def start_txn(self, t: dict, owner, index: int):
        """Start one txn; its result goes to entry_done(owner, index, result).
        Returns the TwoPC when the txn is cross-shard and undecided, else None."""
        reads, writes = t["reads"], t["writes"]
        n = self.nshards
        if n == 1:
            single = 0 if reads or writes else None
        else:
            crc = zlib.crc32
            rshards = [crc(k) % n for k, _ in reads]
            wshards = [crc(k) % n for k, _ in writes]
            first = rshards[0] if rshards else (wshards[0] if wshards else None)
            single = first if (rshards.count(first) == len(rshards)
                               and wshards.count(first) == len(wshards)) else None
        if single is not None:
            link = self.links[single]
            if link.state != "up":
                self.entry_done(owner, index, {"ok": False, "error": unavailable(
                    "a shard is down or restarting", outcome="aborted")})
                return None
            if not writes:
                return self.validate_only({single: (reads, writes)}, owner, index)
            ts = self.oracle.next()
            self.send_item(link, [m.ITEM_COMMIT, ts, reads, writes], (KIND_COMMIT, owner, index, ts))
            return None
        if not reads and not writes:
            return self.validate_only({}, owner, index)
        parts = parts_by_shard(reads, writes, rshards, wshards)
        if not self.shards_up(parts):
            self.entry_done(owner, index, {"ok": False, "error": unavailable(
                "a shard is down or restarting", outcome="aborted")})
            return None
        if not writes:
            return self.validate_only(parts, owner, index)
        if self.barriers:
            self.held.append(lambda: self.start_txn(t, owner, index))
            return None
        return self.start_2pc(parts, owner, index)

    @staticmethod
    def txn_error(reply: dict) -> dict:
        return Router.txn_error_of(reply.get("error") or {})

    @staticmethod
    def txn_error_of(e: dict) -> dict:
        """A client error for a failed txn step, from the shard's error map."""
        code = e.get("code")
        if code == m.STALE_INC:
            return unavailable("shard restarted", outcome="aborted")
        if code == "unavailable" or code is None:
            return unavailable(e.get("message", "shard unavailable"),
                               outcome="unknown" if e.get("lost") else "aborted")
        return Router.shard_error({"error": e})

    def validate_only(self, parts, owner, index):
        S = self.oracle.last
        done = lambda result: self.entry_done(owner, index, result)  # noqa: E731
        if not parts:
            done({"ok": True, "commit_ts": S})
            return None

        def on_replies(replies):
            keys = []
            for reply in replies.values():
                if not reply.get("ok"):
                    e = reply.get("error") or {}
                    if e.get("code") != "conflict":
                        error = self.txn_error(reply)
                        if error["code"] == "unavailable":
                            error["outcome"] = "aborted"   # validation never writes
                        return done({"ok": False, "error": error})
                    keys.extend(e.get("keys", []))
            if keys:
                return done({"ok": False, "error": err("conflict", "read versions changed", True, keys=keys)})
            done({"ok": True, "commit_ts": S})
        self.scatter({s: {"op": m.VALIDATE, "reads": reads} for s, (reads, _) in parts.items()}, on_replies)
        return None

    def start_2pc(self, parts, owner, index) -> TwoPC:
        ts = self.oracle.next()
        participants = sorted(parts)
        txn = TwoPC(ts, participants, owner, index)
        self.txns[ts] = txn
        self.undecided += 1
        self.twopc["started"] += 1
        target = (KIND_PREPARE, txn)
        links = self.links
        for s in participants:        # send_item, inlined: this runs per participant
            reads, writes = parts[s]
            link = links[s]
            group = link.group or self.open_group(link)
            group.items.append([m.ITEM_PREPARE, ts, reads, writes, participants])
            group.targets.append(target)
        return txn

    def on_prepared(self, txn: TwoPC, e) -> None:
        """One participant's prepare result (None = ok); decide once all are in."""
        txn.waiting -= 1
        if txn.decision is not None:
            return   # decided already (a participant restarted mid-prepare)
        if e is not None:
            if e.get("code") in NOT_PREPARED:
                txn.refused = True
            if e.get("code") == "conflict":
                txn.conflict_keys.extend(e.get("keys", []))
            elif txn.failure is None:
                failure = self.shard_error({"error": e})
                if failure["code"] == "unavailable":
                    failure["outcome"] = "aborted"
                txn.failure = failure
        if txn.waiting > 0:
            return
        if txn.conflict_keys:
            self.decide(txn, False, err("conflict", "read versions changed or key locked", True,
                                        keys=txn.conflict_keys))
        elif txn.failure is not None:
            self.decide(txn, False, txn.failure)
        else:
            self.decide(txn, True)

    def decide(self, txn: TwoPC, commit: bool, error: dict = None) -> None:
        txn.decision = "commit" if commit else "abort"
        self.undecided -= 1
        links = self.links
        if commit:
            self.twopc["committed"] += 1
            txn.unacked = set(txn.participants)
            ts = txn.ts
            for s in txn.participants:
                link = links[s]
                if link.state == "up":      # one that is not gets it when it is resolved
                    group = link.group or self.open_group(link)
                    group.items.append([m.ITEM_COMMIT_PREPARED, ts, ts])
                    group.targets.append((KIND_COMMIT_PREPARED, txn, s))
            # Every participant acked its prepare after making it durable, so the recovery
            # rule commits this txn whatever fails from here on: answer now rather than
            # one more shard round trip later. A later read of its keys reaches each shard
            # after the commit_prepared (FIFO), or waits on the prepared key.
            self.entry_done(txn.owner, txn.index, {"ok": True, "commit_ts": ts})
        else:
            self.twopc["aborted"] += 1
            target = (KIND_ABORT, txn)
            for s in txn.participants:
                if links[s].state == "up":
                    txn.acks_waiting += 1
                    self.send_item(links[s], [m.ITEM_ABORT_PREPARED, txn.ts], target)
            self.txns.pop(txn.ts, None)   # a leftover prepare is resolved by recovery
            if txn.refused:
                # a participant never prepared it, so no recovery can commit it
                self.entry_done(txn.owner, txn.index, {"ok": False, "error": error})
            elif not txn.acks_waiting:
                self.entry_done(txn.owner, txn.index, {"ok": False, "error": unavailable(
                    "participants down", outcome="unknown")})
            else:
                txn.abort_error = error     # answered at the first abort ack (on_abort_ack)
        if txn.run is not None:
            self.batch_decided(txn.run, txn)
        if self.barriers or self.held:
            self.check_barriers()

    def on_commit_ack(self, txn: TwoPC, shard: int, e) -> None:
        """One participant's commit_prepared result (the client was answered at the
        decision). A participant that failed to ack gets the commit again when it is
        resolved (it still holds the txn prepared, and the router knows the decision)."""
        if e is None:
            self.commit_acked(txn, shard)
        elif e.get("code") not in ("unavailable", m.STALE_INC):
            sys.stderr.write(f"router: commit_prepared of txn {txn.ts} failed at shard {shard}: {e}\n")

    def on_abort_ack(self, txn: TwoPC, e) -> None:
        """One participant's abort_prepared result. An abort every participant may have
        prepared is answered at the first success: from then on a participant lacks the
        txn, so no recovery can commit it."""
        txn.acks_waiting -= 1
        if txn.abort_error is None or txn.any_ack:
            return                  # answered at the decision, or already here
        if e is None:
            txn.any_ack = True
            self.entry_done(txn.owner, txn.index, {"ok": False, "error": txn.abort_error})
        elif txn.acks_waiting == 0:
            self.entry_done(txn.owner, txn.index, {"ok": False, "error": unavailable(
                "abort not acknowledged", outcome="unknown")})

    def commit_acked(self, txn: TwoPC, shard: int) -> None:
        txn.unacked.discard(shard)
        if not txn.unacked and self.txns.pop(txn.ts, None) is not None:
            for s in txn.participants:
                if self.links[s].state in ("up", "resolving"):
                    self.links[s].forgets.append(txn.ts)

    def op_batch(self, ctx, req):
        txns = req["txns"]
        if not txns:
            return self.reply(ctx, results=[])
        routes = route_batch(txns, self.nshards)      # None: some key is in two entries
        self.pump_batch(BatchRun(ctx, txns, track_keys=routes is None, routes=routes))

    def pump_batch(self, run: BatchRun) -> None:
        if run.locked is None:
            return self.dispatch_unshared(run)
        locked = run.locked
        while run.next < len(run.txns):
            t = run.txns[run.next]
            if locked and (any(k in locked for k, _ in t["reads"])
                           or any(k in locked for k, _ in t["writes"])):
                return   # touches an undecided 2PC entry: resumed when that one is decided
            if self.barriers and self.is_cross_shard(t):
                self.held.append(lambda: self.pump_batch(run))
                return
            i = run.next
            run.next += 1
            txn = self.start_txn(t, run, i)
            if txn is not None and txn.decision is None:
                keys = {k for k, _ in t["reads"]}
                keys.update(k for k, _ in t["writes"])
                run.undecided[txn] = keys
                locked.update(keys)
                txn.run = run

    def dispatch_unshared(self, run: BatchRun) -> None:
        """Dispatch the entries of a batch in which no key is in two entries, so no entry
        waits on another: start_txn inlined for the common cases (every shard up, writes,
        no barrier), with each entry's shards from run.routes (route_batch, computed for
        the whole batch at once); anything else goes through start_txn itself. Same
        messages, same ts order as entry-by-entry start_txn."""
        txns = run.txns
        routes = run.routes
        count = len(txns)
        links = self.links
        oracle = self.oracle
        i = run.next
        while i < count:
            t = txns[i]
            reads = t["reads"]
            writes = t["writes"]
            if not writes or self.barriers:
                if self.barriers and self.is_cross_shard(t):
                    run.next = i
                    self.held.append(lambda: self.pump_batch(run))
                    return
                run.next = i + 1
                self.start_txn(t, run, i)
                i += 1
                continue
            route = routes[i]
            if route.__class__ is int:    # every key on one shard (it has keys: it writes)
                link = links[route]
                if link.state != "up":
                    run.next = i + 1
                    self.start_txn(t, run, i)   # answers unavailable
                    i += 1
                    continue
                ts = oracle.next()
                group = link.group or self.open_group(link)
                group.items.append([m.ITEM_COMMIT, ts, reads, writes])
                group.targets.append((KIND_COMMIT, run, i, ts))
                i += 1
                continue
            run.next = i + 1
            if self.shards_up(route):
                self.start_2pc(route, run, i)
            else:
                self.start_txn(t, run, i)   # answers unavailable
            i += 1
        run.next = i

    def batch_decided(self, run: BatchRun, txn: TwoPC) -> None:
        keys = run.undecided.pop(txn, ())
        run.locked.subtract(keys)
        for k in keys:
            if run.locked[k] <= 0:
                del run.locked[k]
        self.pump_batch(run)

    def is_cross_shard(self, t) -> bool:
        n = self.nshards
        shards = {zlib.crc32(k) % n for k, _ in t["reads"]} | {zlib.crc32(k) % n for k, _ in t["writes"]}
        return len(shards) > 1 and bool(t["writes"])

    # -- barrier ops: flush, checkpoint create

    def barrier(self, fn) -> None:
        """Run fn(S) once no 2PC txn is undecided; new 2PC starts wait until then."""
        self.barriers.append(fn)
        self.check_barriers()

    def check_barriers(self) -> None:
        while self.barriers and self.undecided == 0:
            fn = self.barriers.popleft()
            fn(self.oracle.next())
        if not self.barriers and self.held:
            held, self.held = self.held, []
            for resume in held:
                resume()

    def op_flush(self, ctx, req):
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))

        def at_cut(S):
            def done(replies):
                keys = nbytes = 0
                for reply in replies.values():
                    if not reply.get("ok"):
                        return self.fail(ctx, self.shard_error(reply))
                    keys += int(reply.get("keys", 0))
                    nbytes += int(reply.get("bytes", 0))
                self.reply(ctx, flush_ts=S, keys=keys, bytes=nbytes)
            self.scatter({s: {"op": m.FLUSH, "ts": S} for s in range(self.nshards)}, done)
        self.barrier(at_cut)

    def checkpoints_dir(self) -> str:
        return os.path.join(self.data_dir, "checkpoints")

    def op_checkpoint(self, ctx, req):
        action = req.get("action")
        name = req.get("name")
        if name is not None and (not name or "/" in name or name.startswith(".")):
            return self.fail(ctx, err("bad_request", f"invalid checkpoint name {name!r}"))
        if action == "create":
            return self.checkpoint_create(ctx, name)
        if action == "list":
            return self.reply(ctx, checkpoints=self.checkpoint_list())
        if action == "delete":
            if name is None:
                return self.fail(ctx, err("bad_request", "delete needs a name"))
            path = os.path.join(self.checkpoints_dir(), name)
            if name in self.creating_checkpoints:
                # Deleting it under the create made the create fail to write its MANIFEST
                # and never answer; it is not in `list` yet, so it is not there to delete.
                return self.fail(ctx, unavailable(f"checkpoint {name!r} is still being created"))
            if not os.path.isdir(path):
                return self.fail(ctx, err("not_found", f"no checkpoint named {name!r}"))
            shutil.rmtree(path)
            return self.reply(ctx)
        self.fail(ctx, err("bad_request", f"unknown checkpoint action {action!r}"))

    def checkpoint_create(self, ctx, name):
        if name is None:
            now = time.time()
            name = time.strftime("ckpt-%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}"
        path = os.path.join(self.checkpoints_dir(), name)
        if os.path.exists(path):
            return self.fail(ctx, err("bad_request", f"checkpoint {name!r} already exists"))
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))
        os.makedirs(path, mode=0o700)
        self.creating_checkpoints.add(name)

        def at_cut(S):
            block = self.block_height

            def done(replies):
                self.creating_checkpoints.discard(name)
                for reply in replies.values():
                    if not reply.get("ok"):
                        shutil.rmtree(path, ignore_errors=True)
                        return self.fail(ctx, self.shard_error(reply))
                created = time.time()
                manifest = {"name": name, "ts": S, "block": block, "created_at": created,
                            "shards": self.nshards}
                tmp = os.path.join(path, "MANIFEST.json.tmp")
                try:
                    with open(tmp, "w") as f:
                        json.dump(manifest, f)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, os.path.join(path, "MANIFEST.json"))   # written last: now it exists
                except OSError as exc:     # the disk, or the directory gone: answer, never hang
                    shutil.rmtree(path, ignore_errors=True)
                    return self.fail(ctx, err("internal", f"checkpoint {name!r}: writing its manifest "
                                                          f"failed: {exc}"))
                self.reply(ctx, name=name, ts=S, block=block, created_at=created)
            self.scatter({s: {"op": m.CHECKPOINT, "dir": os.path.join(path, f"shard-{s}"), "ts": S}
                          for s in range(self.nshards)}, done)
        self.barrier(at_cut)

    def checkpoint_list(self) -> list:
        out = []
        base = self.checkpoints_dir()
        if not os.path.isdir(base):
            return out
        for name in sorted(os.listdir(base)):
            try:
                with open(os.path.join(base, name, "MANIFEST.json")) as f:
                    man = json.load(f)
            except (OSError, ValueError):
                continue   # incomplete or foreign directory: not a checkpoint
            out.append({"name": man.get("name", name), "ts": man.get("ts"), "block": man.get("block"),
                        "created_at": man.get("created_at"), "bytes": disk_usage(os.path.join(base, name))})
        out.sort(key=lambda c: c["created_at"] or 0)
        return out

    # -- block, prune, stats

    def op_block(self, ctx, req):
        height = int(req["height"])
        if height <= self.block_height:
            return self.fail(ctx, err("bad_request", f"block height must increase (current {self.block_height})"))
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))
        previous, self.block_height = self.block_height, height

        def done(replies):
            for reply in replies.values():
                if not reply.get("ok"):
                    if self.block_height == height:
                        self.block_height = previous
                    return self.fail(ctx, self.shard_error(reply))
            self.reply(ctx, height=height, flushed=any(r.get("flushed") for r in replies.values()))
        self.scatter({s: {"op": m.BLOCK, "height": height} for s in range(self.nshards)}, done)

    def op_prune(self, ctx, req):
        keep = req.get("keep_versions")
        keep = self.keep_versions if keep is None else int(keep)
        if keep < 1:
            return self.fail(ctx, err("bad_request", "keep_versions must be >= 1"))
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))

        def done(replies):
            total = 0
            for reply in replies.values():
                if not reply.get("ok"):
                    return self.fail(ctx, self.shard_error(reply))
                total += int(reply.get("versions_removed", 0))
            self.reply(ctx, versions_removed=total)
        self.scatter({s: {"op": m.PRUNE, "keep_versions": keep} for s in range(self.nshards)}, done)

    def op_stats(self, ctx, req):
        up = [s for s in range(self.nshards) if self.links[s].state == "up"]

        def done(replies):
            shards = []
            for s in range(self.nshards):
                reply = replies.get(s)
                if reply is None or not reply.get("ok"):
                    # every field PROTOCOL.md lists, zero: a client can read a down shard's
                    # entry like any other (it had only shard, pid and up)
                    shards.append({**shard_entry(s, {"pid": self.links[s].pid}), "up": False})
                    continue
                shards.append(shard_entry(s, reply))
            node = {"supervisor_pid": os.getppid(), "router_pid": os.getpid(), "ts": self.oracle.last,
                    "block_height": self.block_height, "shards": self.nshards,
                    "inflight": self.inflight, "twopc": dict(self.twopc),
                    "requests": {f"{op}:{res}": n for (op, res), n in self.results.items()},
                    **self.node_txn_figures()}
            self.reply(ctx, node=node, shards=shards)
        if not up:
            return done({})
        self.scatter({s: {"op": m.STATS} for s in up}, done)

    def node_txn_figures(self) -> dict:
        """TPS, success rate and end-to-end latency of the whole node, as a client sees it:
        latency is the router's `txn` request histogram (one transaction per request)."""
        done = sum(self.txn_outcomes.values())
        figures = {"tps": self.committed_rate.rate(),
                   "txn_committed": self.txn_outcomes["committed"],
                   "txn_conflict": self.txn_outcomes["conflict"],
                   "txn_error": self.txn_outcomes["error"],
                   "success_rate": self.txn_outcomes["committed"] / done if done else None}
        hist = self.req_hist.get("txn")
        if hist is not None:
            figures.update(summary_ms(hist.snapshot()))
        return figures

    def snapshot(self) -> dict:
        return {"role": "router", "pid": os.getpid(), "ts": time.time(), "commit_ts": self.oracle.last,
                "block_height": self.block_height,
                "requests": {op: h.snapshot() for op, h in self.req_hist.items()},
                "results": [[op, res, n] for (op, res), n in self.results.items()],
                "twopc": dict(self.twopc), "inflight": self.inflight,
                "shards_up": {str(l.index): l.state == "up" for l in self.links}}


def shard_entry(s: int, st: dict) -> dict:
    txn = st.get("txn", {})
    flush = st.get("flush", {})
    prune = st.get("prune", {})
    return {"shard": s, "pid": st.get("pid"), "up": True, "inc": st.get("inc"),
            "keys": st.get("keys", 0), "versions": st.get("versions", 0),
            "txn_committed": txn.get("committed", 0), "txn_conflict": txn.get("conflict", 0),
            "tps": st.get("tps", 0.0), "latency_p50_ms": st.get("latency_p50_ms", 0.0),
            "latency_p90_ms": st.get("latency_p90_ms", 0.0), "latency_p99_ms": st.get("latency_p99_ms", 0.0),
            "flush": {k: flush.get(k, 0) for k in ("flush_count", "keys_flushed", "bytes_flushed",
                                                   "last_flush_ts", "last_flush_block")},
            "prune": {k: prune.get(k, 0) for k in ("prune_count", "versions_removed")},
            "horizon": st.get("horizon", 0), "max_ts": st.get("max_ts", 0),
            "block_height": st.get("block_height", 0), "prepared": st.get("prepared", 0)}


def disk_usage(path: str) -> int:
    """Bytes used by files under path, each inode once (checkpoints are hard links)."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def main(argv=None) -> int:
    spec = parse_spec(argv)
    set_parent_death_signal()
    return Router(spec).run()


if __name__ == "__main__":
    sys.exit(main())
