"""The list-append workload against a live node (PROTOCOL.md over DEALER sockets): client
threads run txns, batches, snapshot gets and scans on a small key space and record a
History for tests/e2e/listappend.py to check.

- txn: `get` 1-3 keys, then a `txn` reading all of them and appending its element to a
  random subset (none: a read-only txn; some: the others are only read, write-skew shapes).
- batch: one `get` of 2-4 keys, then a `batch` of 2-4 such txns over them, so entries
  often share keys: a later entry that read a key an earlier one appended to must be
  refused if that one committed (entries apply in list order).
- get: 3-6 keys across shards, at the latest ts or `at` an earlier ts seen.
- scan: the whole key space by prefix, at the latest ts or an earlier one.
- optionally (`admin`), `flush` and `checkpoint create`: barriers that hold new
  cross-shard txns until none is undecided; and (`prune`) prunes, after which a read at
  an older ts may answer `too_old` and the walk below stops at the read horizon
  (elements below it may then have no known commit_ts, and the checks that need one
  skip them).
- at a fault (Workload.burst_during): a burst of pipelined cross-shard txns planned from
  a stale get, so the fault lands while 2PC txns are half prepared.

Every op records its send and reply time (time.monotonic(), one process) and what came
back. A txn whose reply does not come (timeout, or the router was killed after it was
sent: Faults.router_killed) or that is answered `unavailable` with outcome other than
"aborted" has an UNKNOWN outcome; `conflict` and `unavailable`/`aborted` are REFUSED.

read_final() reads every key at the end, then walks each key's versions down (a `get`
at version - 1 gives the previous version, until 0): each step is a recorded read, so
the checker knows the commit_ts of every element in the final state, also of txns
whose reply was lost.
"""
from __future__ import annotations

import itertools
import random
import threading
import time

import msgpack
import zmq

from node.routing import shard_of
from tests.e2e.listappend import OK, REFUSED, UNKNOWN, History, Read, Txn

REPLY_TIMEOUT = 8.0        # > the test config's request_timeout_secs (3 s) + read_wait_secs
POLL_SLICE_MS = 50         # how often a wait looks at Faults.router_epoch
BACKOFF_SECS = 0.02        # after an `unavailable` (a shard or the router is down)
PREFIX = b"la/"             # every key of the workload (scans read them all by it)


def key_space(n: int, shards: int = 1) -> list[bytes]:
    """n keys spread evenly over the shards (placement: crc32 % shards, README): a few
    names alone can all land on one shard (la/00..la/03 do on 2), which would leave no
    cross-shard txn to test."""
    per_shard = -(-n // shards)
    keys, taken = [], [0] * shards
    for i in itertools.count():
        key = PREFIX + f"{i:02d}".encode()
        s = shard_of(key, shards)
        if taken[s] < per_shard:
            taken[s] += 1
            keys.append(key)
            if len(keys) == n:
                return keys


def encode(lst: list) -> bytes:
    return msgpack.packb(lst)


def decode(value) -> list:
    return [] if value is None else msgpack.unpackb(value)


class Faults:
    """What the test did to the node, for the clients: each router kill bumps the epoch,
    so a request sent before it stops waiting for a reply that will never come."""

    def __init__(self):
        self.router_epoch = 0

    def router_killed(self) -> None:
        self.router_epoch += 1


class Recorder:
    """The history being recorded, shared by the client threads; wait_for() lets the
    test wait for progress (a count of ops answered or failed) without polling."""

    def __init__(self):
        self.history = History()
        self.unexpected = []          # replies that no run should get (bad_request, internal...)
        self.cond = threading.Condition()
        self.elements = itertools.count(1)
        self.names = itertools.count(1)
        self.ts_seen = [0]            # ts values answered, for reads with `at`
        self.ops = 0

    def name(self, kind: str) -> str:
        return f"{kind}{next(self.names)}"

    def add(self, txns=(), reads=()) -> None:
        with self.cond:
            self.history.txns.extend(txns)
            self.history.reads.extend(reads)
            for op in (*txns, *reads):
                ts = op.commit_ts if isinstance(op, Txn) else op.ts
                if ts:
                    self.ts_seen.append(ts)
            self.ops += 1
            self.cond.notify_all()

    def wait_for(self, ops: int, timeout: float) -> None:
        """Until `ops` ops in all were recorded (TimeoutError past the timeout)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.ops >= ops, timeout):
                raise TimeoutError(f"only {self.ops} of {ops} ops recorded in {timeout} s")

    def unexpected_reply(self, op: str, reply: dict) -> None:
        with self.cond:
            self.unexpected.append((op, reply))


class Connection:
    """One DEALER socket; call() returns the reply, or None when it is lost."""

    def __init__(self, endpoint: str, faults: Faults):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.faults = faults
        self.ids = itertools.count(1)

    def send(self, op: str, **fields) -> int:
        rid = next(self.ids)
        self.sock.send(msgpack.packb({"op": op, "id": rid, **fields}))
        return rid

    def wait(self, rids: set, epoch: int, timeout: float = REPLY_TIMEOUT, got=None,
             enough: int | None = None, arrived=None) -> dict:
        """Replies to `rids` into `got` ({rid: reply}; `arrived`: {rid: monotonic time})
        until all came (or `enough` of them), the deadline passed or the router was
        killed since the requests went out (the others are then lost)."""
        got = {} if got is None else got
        enough = len(rids) if enough is None else enough
        deadline = time.monotonic() + timeout
        while len(got) < enough:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self.sock.poll(int(min(left * 1000, POLL_SLICE_MS)) + 1):
                reply = msgpack.unpackb(self.sock.recv(), raw=False)
                if reply.get("id") in rids:      # else: late, for a request given up on
                    got[reply["id"]] = reply
                    if arrived is not None:
                        arrived[reply["id"]] = time.monotonic()
            elif self.faults.router_epoch != epoch:
                break
        return got

    def call(self, op: str, **fields) -> dict | None:
        epoch = self.faults.router_epoch
        rid = self.send(op, **fields)
        return self.wait({rid}, epoch).get(rid)

    def close(self) -> None:
        self.sock.close()


def txn_outcome(reply: dict | None) -> tuple[str, int | None]:
    if reply is None:
        return UNKNOWN, None
    if reply["ok"]:
        return OK, reply["commit_ts"]
    error = reply["error"]
    if error["code"] == "conflict":
        return REFUSED, None
    if error["code"] == "unavailable":
        return (REFUSED if error.get("outcome") == "aborted" else UNKNOWN), None
    return UNKNOWN, None


def expected_txn_failure(result: dict | None) -> bool:
    """What a txn (or batch entry) may be answered besides ok: conflict, or unavailable
    (with its outcome); anything else (bad_request, internal...) is a finding."""
    return result is None or result["ok"] or result["error"]["code"] in ("conflict", "unavailable")


class Worker(threading.Thread):
    """One client: a DEALER socket and a random mix of ops until stopped or max_ops."""

    MIX = (("txn", 0.55), ("batch", 0.15), ("get", 0.24), ("scan", 0.06))
    # flush and checkpoint create hold new cross-shard txns behind a barrier (DESIGN.md);
    # prune drops old versions, so a read at an older ts may then answer too_old
    ADMIN_MIX = (("flush", 0.5), ("checkpoint", 0.5))
    PRUNE_MIX = (("flush", 0.4), ("checkpoint", 0.3), ("prune", 0.3))

    def __init__(self, endpoint: str, keys: list, recorder: Recorder, faults: Faults,
                 seed: int, stop: threading.Event, max_ops: int, admin: float = 0.0,
                 prune: bool = False):
        super().__init__(daemon=True)
        self.endpoint, self.keys, self.rec, self.faults = endpoint, keys, recorder, faults
        self.rng = random.Random(seed)
        self.stop, self.max_ops = stop, max_ops
        self.admin = admin        # the share of ops that are flushes, checkpoints, prunes
        self.prune = prune
        self.error = None

    def open(self) -> None:
        """The worker's socket, made in the thread that uses it."""
        self.conn = Connection(self.endpoint, self.faults)

    def run(self) -> None:
        self.open()
        admin = self.PRUNE_MIX if self.prune else self.ADMIN_MIX
        mix = [(k, w * (1 - self.admin)) for k, w in self.MIX] + [(k, w * self.admin) for k, w in admin]
        kinds, weights = zip(*mix)
        try:
            for _ in range(self.max_ops):
                if self.stop.is_set():
                    break
                getattr(self, "op_" + self.rng.choices(kinds, weights)[0])()
        except Exception as exc:     # reported by the test, not lost in a thread
            self.error = exc
        finally:
            self.conn.close()

    def backoff(self) -> None:
        self.stop.wait(BACKOFF_SECS)     # rate limit while a shard or the router is down

    def expected_error(self, reply: dict, at) -> bool:
        """unavailable (a shard or the router is down), or too_old for a read at an
        older ts once prunes run."""
        code = reply["error"]["code"]
        return code == "unavailable" or (code == "too_old" and self.prune and at is not None)

    def timed_read(self, op: str, at, **fields) -> tuple[dict, float, float] | None:
        """Send a read op (`get`, `scan`; at `at` when not None): (its reply, sent, replied),
        or None when it failed, which is recorded as progress and backed off from."""
        if at is not None:
            fields["at"] = at
        sent = time.monotonic()
        reply = self.conn.call(op, **fields)
        replied = time.monotonic()
        if reply is None or not reply["ok"]:
            if reply is not None and not self.expected_error(reply, at):
                self.rec.unexpected_reply(op, reply)
            self.rec.add()       # an op that failed is still progress (a shard is down)
            self.backoff()
            return None
        return reply, sent, replied

    def snapshot(self, keys: list, at=None) -> Read | None:
        """A `get` of keys, recorded; None when it failed."""
        answered = self.timed_read("get", at, keys=keys)
        if answered is None:
            return None
        reply, sent, replied = answered
        lists = {k: (decode(v), ver) for k, v, ver in zip(keys, reply["values"], reply["versions"])}
        read = Read(self.rec.name("get"), reply["ts"], lists, at, sent, replied)
        self.rec.add(reads=[read])
        return read

    def plan(self, keys: list, read: Read) -> tuple[dict, dict, list, int]:
        """A txn over `keys` as read: (the txn's fields, its reads, its appends, element)."""
        appends = [] if self.rng.random() < 0.15 else self.rng.sample(keys, self.rng.randint(1, len(keys)))
        element = next(self.rec.elements)
        reads = {k: read.lists[k] for k in keys}
        fields = {"reads": [[k, reads[k][1]] for k in keys],
                  "writes": [[k, encode(reads[k][0] + [element])] for k in appends]}
        return fields, reads, appends, element

    def op_txn(self) -> None:
        keys = self.rng.sample(self.keys, self.rng.randint(1, 3))
        read = self.snapshot(keys)
        if read is None:
            return
        fields, reads, appends, element = self.plan(keys, read)
        sent = time.monotonic()
        reply = self.conn.call("txn", **fields)
        replied = time.monotonic()
        outcome, ts = txn_outcome(reply)
        if not expected_txn_failure(reply):
            self.rec.unexpected_reply("txn", reply)
        self.rec.add(txns=[Txn(f"t{element}", element, reads, appends, outcome, ts, sent,
                               replied if outcome == OK else float("inf"))])
        if outcome != OK and reply is not None and reply["error"]["code"] == "unavailable":
            self.backoff()

    def op_batch(self) -> None:
        pool = self.rng.sample(self.keys, self.rng.randint(2, 4))
        read = self.snapshot(pool)
        if read is None:
            return
        batch = self.rec.name("b")
        planned = [self.plan(self.rng.sample(pool, self.rng.randint(1, min(3, len(pool)))), read)
                   for _ in range(self.rng.randint(2, 4))]
        sent = time.monotonic()
        reply = self.conn.call("batch", txns=[fields for fields, *_ in planned])
        replied = time.monotonic()
        if reply is None:
            results = [None] * len(planned)
        elif not reply["ok"]:
            results = [reply] * len(planned)     # the whole batch failed: each entry so
        else:
            results = reply["results"]
        txns = []
        for i, ((_, reads, appends, element), result) in enumerate(zip(planned, results)):
            outcome, ts = txn_outcome(result)
            if not expected_txn_failure(result):
                self.rec.unexpected_reply("batch entry", result)
            txns.append(Txn(f"t{element}", element, reads, appends, outcome, ts, sent,
                            replied if outcome == OK else float("inf"), batch=(batch, i)))
        self.rec.add(txns=txns)
        if reply is None or not reply["ok"]:
            self.backoff()

    def op_get(self) -> None:
        keys = self.rng.sample(self.keys, self.rng.randint(3, min(6, len(self.keys))))
        at = None
        if self.rng.random() < 0.4:
            seen = self.rec.ts_seen
            at = max(1, seen[self.rng.randrange(max(0, len(seen) - 200), len(seen))] - self.rng.randint(0, 3))
        self.snapshot(keys, at)

    def op_scan(self) -> None:
        at = None
        if self.rng.random() < 0.4:
            at = max(1, self.rng.choice(self.rec.ts_seen[-200:]))
        answered = self.timed_read("scan", at, prefix=PREFIX)
        if answered is None:
            return
        reply, sent, replied = answered
        if reply["more"]:
            self.rec.add()
            return       # a partial page says nothing about the keys after it
        items = {k: (decode(v), ver) for k, v, ver in reply["items"]}
        lists = {k: items.get(k, ([], 0)) for k in self.keys}
        self.rec.add(reads=[Read(self.rec.name("scan"), reply["ts"], lists, at, sent, replied)])

    def admin_op(self, op: str, **fields) -> None:
        reply = self.conn.call(op, **fields)
        if reply is not None and not reply["ok"] and reply["error"]["code"] != "unavailable":
            self.rec.unexpected_reply(op, reply)
        self.rec.add()

    def op_flush(self) -> None:
        self.admin_op("flush")

    def op_checkpoint(self) -> None:
        self.admin_op("checkpoint", action="create")

    def op_prune(self) -> None:
        self.admin_op("prune", keep_versions=self.rng.randint(1, 3))


class Workload:
    """Client threads over one key space; start(), then stop() (joins them)."""

    def __init__(self, endpoint: str, shards: int, keys: int = 12, clients: int = 4,
                 seed: int = 0, max_ops: int = 1_000_000, admin: float = 0.0, prune: bool = False):
        self.endpoint = endpoint
        self.keys = key_space(keys, shards)
        self.recorder = Recorder()
        self.faults = Faults()
        self.stop_event = threading.Event()
        self.rng = random.Random(seed)
        self.workers = [Worker(endpoint, self.keys, self.recorder, self.faults, seed * 1000 + i,
                               self.stop_event, max_ops, admin, prune) for i in range(clients)]

    def start(self) -> "Workload":
        for w in self.workers:
            w.start()
        return self

    def wait_ops(self, more: int, timeout: float = 30.0) -> None:
        """Until `more` ops past those recorded so far are recorded."""
        self.recorder.wait_for(self.recorder.ops + more, timeout)

    def stop(self, timeout: float = 30.0) -> History:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))
        alive = [w.name for w in self.workers if w.is_alive()]
        assert not alive, f"client threads still running: {alive}"
        errors = [w.error for w in self.workers if w.error is not None]
        if errors:
            raise errors[0]
        return self.recorder.history

    def burst_during(self, fault, size: int = 24, stale_ops: int = 40) -> None:
        """Run fault() (a SIGKILL) while `size` pipelined txns are in flight: planned from
        a get taken `stale_ops` ops earlier, each reads 2-3 keys (mostly on several
        shards) and appends to some, so many prepare on one shard and conflict on
        another; the fault comes once the first 1-4 replies are in, with 2PC txns at
        every step (prepared here and not there, decided and not yet applied, aborting)."""
        worker = Worker(self.endpoint, self.keys, self.recorder, self.faults,
                        self.rng.randrange(1 << 30), self.stop_event, 0)   # not started: its ops here
        worker.open()
        rng, conn = worker.rng, worker.conn
        try:
            # All keys, or while that fails (a shard is down, or one restarted just before
            # is still resolving) 1-4 random ones: soon some on shards that are up.
            read = worker.snapshot(self.keys)
            for _ in range(100):
                if read is not None:
                    break
                read = worker.snapshot(rng.sample(self.keys, rng.randint(1, min(4, len(self.keys)))))
            if read is None:      # no key on a shard that is up: the fault alone
                fault()
                return
            self.wait_ops(stale_ops)
            pool = list(read.lists)
            planned = [worker.plan(rng.sample(pool, min(len(pool), rng.randint(2, 3))), read)
                       for _ in range(size)]
            epoch = self.faults.router_epoch
            sent = time.monotonic()
            rids = [conn.send("txn", **fields) for fields, *_ in planned]
            got, arrived = {}, {}
            conn.wait(set(rids), epoch, got=got, enough=rng.randint(1, 4), arrived=arrived)
            fault()
            conn.wait(set(rids), epoch, got=got, arrived=arrived)
        finally:
            conn.close()
        txns = []
        for rid, (_, reads, appends, element) in zip(rids, planned):
            reply = got.get(rid)
            outcome, ts = txn_outcome(reply)
            if not expected_txn_failure(reply):
                self.recorder.unexpected_reply("burst txn", reply)
            txns.append(Txn(f"t{element}", element, reads, appends, outcome, ts, sent,
                            arrived[rid] if outcome == OK else float("inf")))
        self.recorder.add(txns=txns)

    def read_final(self) -> History:
        """The final state of every key and the walk down its versions, into the history
        (the node must be up, every shard recovered)."""
        rec = self.recorder
        conn = Connection(self.endpoint, self.faults)
        try:
            sent = time.monotonic()
            reply = conn.call("get", keys=self.keys)
            assert reply is not None and reply["ok"], f"final read failed: {reply}"
            lists = {k: (decode(v), ver) for k, v, ver in zip(self.keys, reply["values"], reply["versions"])}
            rec.add(reads=[Read("final", reply["ts"], lists, None, sent, time.monotonic())])
            rec.history.final = {k: lst for k, (lst, _) in lists.items()}
            # Each step goes one version down per key; a list-append key has one version
            # per element, so len(final) steps reach version 0 (a longer chain is cut off,
            # and the reads it made already disagree with the final list).
            frontier = {k: ver for k, (lst, ver) in lists.items() if ver > 0}
            for _ in range(max(map(len, rec.history.final.values()), default=0)):
                if not frontier:
                    break
                epoch = self.faults.router_epoch
                rids = {conn.send("get", keys=[k], at=v - 1): (k, v - 1) for k, v in frontier.items()}
                replies = conn.wait(set(rids), epoch, timeout=60.0)
                assert len(replies) == len(rids), "version walk: replies missing"
                frontier = {}
                for rid, (k, at) in rids.items():
                    r = replies[rid]
                    if not r["ok"] and r["error"]["code"] == "too_old":
                        continue      # pruned: the versions below are gone
                    assert r["ok"], f"version walk: get {k!r} at {at}: {r}"
                    lst, ver = decode(r["values"][0]), r["versions"][0]
                    rec.add(reads=[Read(f"walk:{k.decode()}@{at}", at, {k: (lst, ver)}, at)])
                    if ver > 0:
                        frontier[k] = ver
        finally:
            conn.close()
        return rec.history


def summary(history: History) -> dict:
    """Counts that say whether a run exercised anything (for assertions and reports)."""
    txns = history.txns
    ok = [t for t in txns if t.outcome == OK]
    return {
        "txns": len(txns),
        "committed_writes": sum(1 for t in ok if t.writes),
        "committed_read_only": sum(1 for t in ok if not t.writes),
        "write_skew_shapes": sum(1 for t in ok if t.writes and set(t.reads) - set(t.appends)),
        "multi_key_commits": sum(1 for t in ok if len(t.appends) > 1),
        "refused": sum(1 for t in txns if t.outcome == REFUSED),
        "unknown": sum(1 for t in txns if t.outcome == UNKNOWN),
        "batch_entries_ok": sum(1 for t in ok if t.batch is not None),
        "reads": len(history.reads),
        "reads_at": sum(1 for r in history.reads if r.at is not None),
        "elements_in_state": sum(len(v) for v in history.final.values()),
    }
