"""Router: the client ROUTER socket, one Unix-socket stream per shard (shard/link.py), the
ts oracle, and the process loop around them.

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

The Router class is this module (loop, shard messaging, client side, ping/get/scan) plus
three parts of its own module each: node/coordinator.py (txn, batch, 2PC, the barrier),
node/recovery.py (resolving a shard's prepared txns when it comes up) and
node/admin_ops.py (flush, checkpoint, block, prune, stats).
"""
import collections
import os
import secrets
import sys
import time

import zmq

from node.admin_ops import AdminOps
from node.coordinator import TxnCoordinator
from node.errors import err, shard_error, unavailable
from node.protocol import Limits, ProtocolError, decode_request, encode_error, encode_reply
from node.recovery import ShardRecovery
from node.routing import group_keys, shard_of  # noqa: F401 (shard_of re-exported: the placement)
from node.security import secure_client_socket
from node.timestamps import TimestampOracle
from shard import messages as m
from shard.busypoll import BusyPoller, busy_poll_secs
from shard.histogram import Histogram, RateWindow
from shard.keycodec import prefix_end
from shard.link import POLLOUT, connect
from shard.process import (EXIT_FATAL, ProcessProfile, SignalPipe, SupervisorLink, parse_spec,
                          set_parent_death_signal, tune_gc)

MAX_DRAIN = 1024        # client frames taken per loop pass
STOP_DRAIN = 100_000    # at most this many queued frames are still taken on at a stop
STOP_QUIET_SECS = 0.2   # at a stop, keep refusing new frames until none came for this long
STOP_LINGER_MS = 1000   # at the exit, how long ZeroMQ may take to deliver the last replies
WAITER_CHECK_SECS = 0.1  # how often txns waiting on held keys are checked for their deadline
POLL_MS = 20
MAX_FORGETS = 4096      # outcome records to forget that get a frame of their own


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
        # Not up, but serving reads: the shard is read-only (its disk is full) and holds a
        # prepared txn it cannot commit or abort yet (recovery.py). Its writes are refused
        # there anyway, and a read of a key of that txn waits on its lock as always.
        self.readable = False
        self.last_pong = time.monotonic()
        self.outbox = []
        self.group = None          # the open `txns` message at the end of outbox, if any
        self.forgets = []          # txns to forget, sent as one message per loop pass
        self.pending = set()       # rids in flight at this shard
        self.max_ts = 0
        self.block = 0
        self.pid = None


class Request:
    __slots__ = ("envelope", "id", "op", "t0")

    def __init__(self, envelope, id, op, t0):
        self.envelope, self.id, self.op, self.t0 = envelope, id, op, t0


class Router(TxnCoordinator, ShardRecovery, AdminOps):
    """The router process (see the module docstring for how its parts divide the work)."""

    def __init__(self, spec: dict):
        self.config = spec["config"]
        self.nshards = int(spec["shards"])
        # incarnation: new on every start, so the supervisor carries the metrics counters of
        # the previous one over (its first snapshot may hold none of them yet)
        self.inc = secrets.token_hex(8)
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
        self.locked_keys = {}          # key -> the undecided 2PC txn reading or writing it
        self.written_keys = {}         # key -> the undecided 2PC txn writing it
        self.key_waiters = {}          # key -> deque of KeyWaiters (coordinator.py), oldest first
        self.next_waiter_check = 0.0
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
            # No send high-water mark: a ROUTER drops a reply past it without a word, and a
            # DEALER may pipeline any number of requests before it reads (PROTOCOL.md); at
            # 100,000 an audit's client that sent 250,000 first got 150,000 replies. A
            # client that never reads makes the router hold its replies instead.
            self.client.setsockopt(zmq.SNDHWM, 0)
            self.client.setsockopt(zmq.RCVHWM, 100_000)
            self.client.bind(self.listen)
            self.oracle.read_reserved()      # damaged: a boot failure naming the file
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
                    if self.key_waiters:   # never sent: answer them, aborted
                        self.expire_waiters(now, unavailable("the node is stopping", outcome="aborted"))
                    break
        self.flush_outboxes()
        for link in self.links:
            if link.conn is not None:
                link.conn.close()
        self.client.setsockopt(zmq.LINGER, STOP_LINGER_MS)   # the replies of the last pass
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
            # While the link is down they wait: the records are durable, so a restarted
            # shard still holds them.
            if (link.forgets and link.state in ("up", "resolving")
                    and (link.outbox or len(link.forgets) >= MAX_FORGETS)):
                txns, link.forgets = link.forgets, []
                self.send(link, {"op": m.FORGET, "txns": txns},
                          lambda reply, link=link, txns=txns: self.on_forget_reply(link, txns, reply))
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

    @staticmethod
    def on_forget_reply(link: ShardLink, txns: list, reply: dict) -> None:
        """A forget that did not arrive (the connection dropped, or the shard restarted and
        refused the old incarnation's message) goes again with later traffic: forget is
        idempotent, and a lost one would leave the records until the next router start."""
        if not reply.get("ok") and (reply.get("error") or {}).get("code") in ("unavailable", m.STALE_INC):
            link.forgets.extend(txns)

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
        link.readable = False
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
        if self.key_waiters and now >= self.next_waiter_check:
            self.next_waiter_check = now + WAITER_CHECK_SECS
            self.expire_waiters(now)
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
            if self.oracle.failure is not None and self.refused_for_timestamps(ctx, req):
                continue
            try:
                getattr(self, "op_" + req["op"])(ctx, req)
            except Exception as exc:
                self.fail(ctx, err("internal", f"{type(exc).__name__}: {exc}"))

    def refused_for_timestamps(self, ctx: Request, req: dict) -> bool:
        """The timestamp reservation could not be renewed (its disk is full: see
        node/timestamps.py): a request that takes timestamps is answered `unavailable`
        (nothing done) when the rest of the reservation cannot cover it."""
        if self.oracle.room_for(timestamps_needed(req)):
            return False
        extra = {"outcome": "aborted"} if req["op"] in ("txn", "batch") else {}
        self.fail(ctx, unavailable(self.oracle.failure, **extra))
        return True

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

    def shards_readable(self, shards) -> bool:
        links = self.links
        return all(links[s].state == "up" or links[s].readable for s in shards)

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
        if not self.shards_readable(groups):
            return self.fail(ctx, unavailable("a shard is down or restarting"))
        if not groups:
            return self.reply(ctx, ts=S, values=[], versions=[])

        def done(replies):
            values = [None] * len(keys)
            versions = [0] * len(keys)
            for s, reply in replies.items():
                if not reply.get("ok"):
                    return self.fail(ctx, shard_error(reply))
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
        if not self.shards_readable(range(self.nshards)):
            return self.fail(ctx, unavailable("a shard is down or restarting"))

        def done(replies):
            items, more = [], False
            for reply in replies.values():
                if not reply.get("ok"):
                    return self.fail(ctx, shard_error(reply))
                items.extend(reply["items"])
                more = more or reply["more"]
            items.sort(key=lambda it: it[0])
            # a shard with `more` returned `limit` items, all below its unseen keys, so the
            # first `limit` merged items are exact
            more = more or len(items) > limit
            self.reply(ctx, ts=S, items=items[:limit], more=more)
        self.scatter({s: {"op": m.SCAN, "start": start, "end": end, "limit": limit, "at": S}
                      for s in range(self.nshards)}, done)

    def snapshot(self) -> dict:
        return {"role": "router", "pid": os.getpid(), "inc": self.inc, "ts": time.time(),
                "commit_ts": self.oracle.last,
                "block_height": self.block_height,
                "requests": {op: h.snapshot() for op, h in self.req_hist.items()},
                "results": [[op, res, n] for (op, res), n in self.results.items()],
                "twopc": dict(self.twopc), "inflight": self.inflight,
                "txn": dict(self.txn_outcomes),
                "shards_up": {str(l.index): l.state == "up" for l in self.links}}


def timestamps_needed(req: dict) -> int:
    """How many commit timestamps a request may take (at most)."""
    op = req["op"]
    if op == "txn":
        return 1 if req.get("writes") else 0
    if op == "batch":
        return len(req.get("txns") or ())
    if op == "flush" or (op == "checkpoint" and req.get("action") == "create"):
        return 1
    return 0


def main(argv=None) -> int:
    spec = parse_spec(argv)
    set_parent_death_signal()
    return Router(spec).run()


if __name__ == "__main__":
    sys.exit(main())
