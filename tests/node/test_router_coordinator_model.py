"""Property test: the router's transaction coordinator (node/coordinator.py) under random
interleavings of `txn` and `batch` requests and shard replies, in process.

A Router with 2 or 3 shard links marked up and no processes (as the `inproc_router`
fixture, built here per example): its real flush_outboxes sends each loop pass's
messages into a fake connection, and the test answers them by hand with
Router.complete, FIFO per shard, in a random order across shards: each `txns` item ok,
or `conflict` for a commit or prepare; a validate ok or `conflict`; or the whole message
lost (an `unavailable` reply, as at a timeout). Every txn entry is tagged (its read
versions and written values carry a unique number), so each item a shard gets is traced
to the entry it belongs to. A flush op (behind the 2PC barrier) may come in between. Checked after every step, and
at the end once everything was answered:

- every request is answered exactly once, and a batch has one result per entry; an
  entry is answered once, `ok` only if every shard answer for it was ok (with the ts it
  was sent with), `unavailable` only if one was lost, `conflict` only if a shard said so
  or it read a key an undecided 2PC txn writes (then nothing of it is ever sent); so a
  blind write never gets a `conflict` no shard gave, and a `txn` that reads a key being
  written gets `conflict` at once;
- per shard, the ts of commit and prepare items are strictly increasing, and each item
  carries exactly its entry's keys on that shard;
- no commit, prepare or validate reaches a shard while an undecided 2PC txn (other than
  itself) holds one of its keys there (prepared there, its decision not yet sent);
- a commit_prepared follows a commit answer with that ts; a forget follows every
  participant's commit ack; a flush reaches each shard with no txn prepared there and a
  ts above every earlier item's;
- within a batch, entries that share a key get increasing commit_ts in list order when
  both commit (equal allowed when the later one is read-only: a validation at S = the
  last ts covers an earlier entry committed at S);
- the router's tables agree with each other (locked_keys / written_keys hold exactly the
  keys of the undecided 2PC txns, a key waited on is held); and once drained, they and
  key_waiters and the pending table are empty and no 2PC txn is undecided.

The machine runs with whatever node.routing loaded (the C helpers of node/_routing.c when
built), then again with node/routing.py's Python reference patched into node.coordinator
(first_locked, lock_parts, unlock_parts, route_batch).
"""
import collections
import shutil
import tempfile
import zlib

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import node.coordinator as coordinator
from node import routing
from node.coordinator import BatchRun
from node.router import Request, Router, ShardLink
from shard import messages as m

KEYS_PER_SHARD = 2
POOL = 3 * KEYS_PER_SHARD          # key indices drawn, taken modulo the pool of the example


def key_on(shard: int, nshards: int, tag: str) -> bytes:
    return next(k for k in (f"{tag}{i}".encode() for i in range(1000)) if zlib.crc32(k) % nshards == shard)


class FakeConn:
    """A connection that keeps the frames flush_outboxes sends."""

    def __init__(self):
        self.frames = []

    def send(self, frame) -> bool:
        self.frames.append(frame)
        return True

    def sync_poller(self, poller) -> None:
        pass


class Entry:
    """One txn of a request (a `txn` request has one), as the test sent it."""

    def __init__(self, tag, req, index, read_keys, write_keys):
        self.tag = tag
        self.req = req
        self.index = index
        self.reads = [(k, tag) for k in read_keys]              # the version carries the tag
        self.writes = [(k, b"v%d" % tag) for k in write_keys]   # so does the value
        self.keys = set(read_keys) | set(write_keys)
        self.result = None
        self.ts = None             # the ts of its commit or prepare items
        self.sent = []             # (shard, "commit" | "prepare" | "validate")
        self.answers = {}          # (shard, kind) -> "ok" | "conflict" | "lost"
        self.participants = None
        self.router_refused = False

    def as_request(self) -> dict:
        return {"reads": list(self.reads), "writes": list(self.writes), "block": None}


class Req:
    def __init__(self, op, ctx):
        self.op = op
        self.ctx = ctx
        self.entries = []
        self.answer = None


def tag_of(pairs_r, pairs_w) -> int:
    """The entry tag an item's keys carry (all of them the same)."""
    tags = {v for _, v in pairs_r} | {int(v[1:]) for _, v in pairs_w}
    assert len(tags) == 1, f"an item mixes keys of several txns: {pairs_r} {pairs_w}"
    return tags.pop()


class CoordinatorMachine(RuleBasedStateMachine):
    """Requests, flush ops and loop passes (shard replies, then the outboxes go out)."""

    def __init__(self):
        super().__init__()
        self.r = None
        self.busy = False

    @initialize(nshards=st.sampled_from([2, 3]))
    def setup(self, nshards):
        self.busy = True
        self.tmp = tempfile.mkdtemp(prefix="coord-model-")
        r = self.r = Router({"config": {}, "shards": nshards, "data_dir": self.tmp, "run_dir": self.tmp})
        r.oracle.start(0)
        r.poller = None
        for i in range(nshards):
            link = ShardLink(i, f"{self.tmp}/shard-{i}.sock")
            link.state, link.inc, link.conn = "up", f"inc-{i}", FakeConn()
            r.links.append(link)
        self.n = nshards
        self.keys = [key_on(s, nshards, f"k{j}-") for s in range(nshards) for j in range(KEYS_PER_SHARD)]
        self.entries = {}                   # tag -> Entry
        self.reqs = []
        self.by_ctx = {}                    # id(ctx) -> Req
        self.next_tag = 1
        self.inflight = [collections.deque() for _ in range(nshards)]   # sent, unanswered
        self.held = [{} for _ in range(nshards)]   # per shard: txn ts -> keys prepared there
        self.last_ts = [0] * nshards
        self.prepare_tag = {}               # 2PC ts -> entry tag
        self.commit_acks = collections.defaultdict(set)   # 2PC ts -> shards that acked commit
        # The router runs continuations under `except Exception` (Router.complete,
        # on_group): a failed check in one is kept in self.errors and raised after the step.
        self.errors = []
        r.reply = lambda ctx, **fields: self.kept(self.on_answer, ctx, fields)
        r.fail = lambda ctx, error: self.kept(self.on_answer, ctx, {"error": error})
        entry_done = r.entry_done
        r.entry_done = lambda owner, index, result: (self.kept(self.on_entry_done, owner, index, result),
                                                     entry_done(owner, index, result))
        self.busy = False

    def kept(self, check, *args) -> None:
        try:
            check(*args)
        except AssertionError as exc:
            self.errors.append(exc)

    def teardown(self):
        if self.r is None:
            return
        try:
            if not self.busy and not self.errors:   # else report the step, not the drain
                self.drain_and_check()
                if self.errors:
                    raise self.errors[0]
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- requests

    def new_entry(self, req, index, spec) -> Entry:
        read_idx, write_idx = spec
        pool = self.keys
        writes = dict.fromkeys(pool[i % len(pool)] for i in write_idx)   # as decoded: no key twice
        entry = Entry(self.next_tag, req, index, [pool[i % len(pool)] for i in read_idx], list(writes))
        self.entries[entry.tag] = entry
        self.next_tag += 1
        return entry

    def new_req(self, op) -> Req:
        ctx = Request([b"client"], len(self.reqs), op, 0.0)
        req = Req(op, ctx)
        self.reqs.append(req)
        self.by_ctx[id(ctx)] = req
        return req

    # (read key indices, a key may repeat; written key indices)
    TXN = st.tuples(st.lists(st.integers(0, POOL - 1), max_size=3),
                    st.lists(st.integers(0, POOL - 1), max_size=3, unique=True))

    @rule(spec=TXN)
    def submit_txn(self, spec):
        self.busy = True
        req = self.new_req("txn")
        entry = self.new_entry(req, 0, spec)
        req.entries.append(entry)
        doomed = [k for k, _ in entry.reads if k in self.r.written_keys]
        self.r.op_txn(req.ctx, entry.as_request())
        if doomed:     # reads a key being written: answered conflict at once, nothing sent
            assert req.answer is not None and req.answer["error"]["code"] == "conflict", req.answer
        self.busy = False

    @rule(specs=st.lists(TXN, max_size=5), unshared=st.booleans())
    def submit_batch(self, specs, unshared):
        self.busy = True
        if unshared:   # drop the keys an earlier entry has: the batch shares none
            used, kept = set(), []
            for reads, writes in specs:
                reads = [i for i in reads if i % len(self.keys) not in used]
                writes = [i for i in writes if i % len(self.keys) not in used]
                used.update(i % len(self.keys) for i in reads + writes)
                kept.append((reads, writes))
            specs = kept
        req = self.new_req("batch")
        req.entries = [self.new_entry(req, i, spec) for i, spec in enumerate(specs)]
        self.r.op_batch(req.ctx, {"txns": [e.as_request() for e in req.entries]})
        self.busy = False

    @rule()
    def submit_flush(self):
        """A flush op: behind the 2PC barrier (new 2PC txns are held until it is cut)."""
        self.busy = True
        req = self.new_req("flush")
        self.r.op_flush(req.ctx, {})
        self.busy = False

    # -- the shards

    def send_all(self) -> None:
        self.r.flush_outboxes()
        for s, link in enumerate(self.r.links):
            frames, link.conn.frames = link.conn.frames, []
            for frame in frames:
                msg = m.unpack(frame)
                for one in (msg["msgs"] if msg["op"] == m.MULTI else [msg]):
                    self.on_sent(s, one)
                    self.inflight[s].append(one)

    def check_free(self, s: int, keys, own_ts=None) -> None:
        for ts, held in self.held[s].items():
            if ts != own_ts and held & set(keys):
                raise AssertionError(f"sent to shard {s} while undecided 2PC txn {ts} holds "
                                     f"{sorted(held & set(keys))} there")

    def check_part(self, s: int, entry: Entry, reads, writes) -> None:
        """The item carries exactly the entry's keys on shard s."""
        n = self.n
        assert sorted(map(tuple, reads)) == sorted((k, v) for k, v in entry.reads if zlib.crc32(k) % n == s)
        assert sorted(map(tuple, writes)) == sorted((k, v) for k, v in entry.writes if zlib.crc32(k) % n == s)
        assert not entry.router_refused, f"entry {entry.tag} was refused by the router, then sent"
        assert entry.result is None, f"entry {entry.tag} sent after its answer"

    def on_sent(self, s: int, msg: dict) -> None:
        op = msg["op"]
        if op == m.TXNS:
            for item in msg["items"]:
                kind = item[0]
                if kind in (m.ITEM_COMMIT, m.ITEM_PREPARE):
                    ts, reads, writes = item[1], item[2], item[3]
                    assert ts > self.last_ts[s], f"shard {s}: ts {ts} after {self.last_ts[s]}"
                    self.last_ts[s] = ts
                    entry = self.entries[tag_of(reads, writes)]
                    self.check_part(s, entry, reads, writes)
                    keys = [k for k, _ in reads] + [k for k, _ in writes]
                    if kind == m.ITEM_COMMIT:
                        assert entry.ts is None, f"entry {entry.tag} sent twice"
                        assert {zlib.crc32(k) % self.n for k in entry.keys} == {s}
                        self.check_free(s, keys)
                        entry.ts = ts
                        entry.sent.append((s, "commit"))
                    else:
                        participants = item[4]
                        assert entry.ts in (None, ts), f"entry {entry.tag} prepared twice"
                        assert participants == sorted({zlib.crc32(k) % self.n for k in entry.keys})
                        assert (s, "prepare") not in entry.sent
                        self.check_free(s, keys, own_ts=ts)
                        entry.ts, entry.participants = ts, participants
                        entry.sent.append((s, "prepare"))
                        self.held[s][ts] = set(keys)
                        self.prepare_tag[ts] = entry.tag
                elif kind == m.ITEM_COMMIT_PREPARED:
                    txn, ts = item[1], item[2]
                    assert txn == ts and txn in self.held[s], f"shard {s}: commit of {txn} not prepared there"
                    del self.held[s][txn]
                    entry = self.entries[self.prepare_tag[txn]]
                    assert entry.result == {"ok": True, "commit_ts": txn}, (txn, entry.result)
                elif kind == m.ITEM_ABORT_PREPARED:
                    txn = item[1]
                    assert txn in self.held[s], f"shard {s}: abort of {txn} not prepared there"
                    del self.held[s][txn]
                    entry = self.entries[self.prepare_tag[txn]]
                    assert entry.result is None or not entry.result["ok"], entry.result
                else:
                    raise AssertionError(f"unknown item {item}")
        elif op == m.VALIDATE:
            reads = msg["reads"]
            entry = self.entries[tag_of(reads, [])]
            assert not entry.writes
            self.check_part(s, entry, reads, [])
            self.check_free(s, [k for k, _ in reads])
            assert (s, "validate") not in entry.sent
            entry.sent.append((s, "validate"))
        elif op == m.FLUSH:
            ts = msg["ts"]
            assert not self.held[s], f"flush at {ts} reaches shard {s} with {sorted(self.held[s])} prepared"
            assert ts > self.last_ts[s], f"shard {s}: flush ts {ts} after {self.last_ts[s]}"
            self.last_ts[s] = ts
        elif op == m.FORGET:
            for txn in msg["txns"]:
                entry = self.entries[self.prepare_tag[txn]]
                assert self.commit_acks[txn] == set(entry.participants), (txn, self.commit_acks[txn])
        else:
            raise AssertionError(f"unexpected message to shard {s}: {msg}")

    @rule(data=st.data(), count=st.integers(0, 12))
    def loop_pass(self, data, count):
        """One pass of the router's loop: the replies to the oldest unanswered messages of
        random shards (FIFO per shard), then every outbox goes out (with what the
        requests submitted since the last pass and these replies queued)."""
        self.busy = True
        for _ in range(count):
            live = [s for s in range(self.n) if self.inflight[s]]
            if not live:
                break
            s = data.draw(st.sampled_from(live), label="shard")
            lost = data.draw(st.sampled_from([False] * 7 + [True]), label="lost")
            self.answer(s, lost, lambda: data.draw(st.sampled_from([False] * 3 + [True]), label="conflict"))
        self.send_all()
        self.busy = False

    def answer(self, s: int, lost: bool, conflict) -> None:
        msg = self.inflight[s].popleft()
        rid, op = msg["rid"], msg["op"]
        if lost:
            reply = m.error(rid, "unavailable", "connection closed", True, lost=True)
        elif op == m.TXNS:
            results = []
            for item in msg["items"]:
                e = None
                if item[0] in (m.ITEM_COMMIT, m.ITEM_PREPARE) and conflict():
                    e = {"code": "conflict", "message": "read versions changed", "retryable": True,
                         "keys": [(item[2] or item[3])[0][0]]}
                elif item[0] == m.ITEM_COMMIT_PREPARED:
                    self.commit_acks[item[1]].add(s)
                results.append(e)
            reply = {"rid": rid, "ok": True, "results": results}
        elif op == m.VALIDATE and conflict():
            reply = m.error(rid, "conflict", "read versions changed", True, keys=[msg["reads"][0][0]])
        else:
            reply = {"rid": rid, "ok": True}
        self.record(s, msg, reply)
        self.r.complete(rid, reply)

    def record(self, s: int, msg: dict, reply: dict) -> None:
        """What each entry was told by shard s (before the router hears it)."""
        def outcome(e):
            if e is None:
                return "ok"
            return "lost" if e["code"] == "unavailable" else e["code"]
        if msg["op"] == m.TXNS:
            results = reply["results"] if reply["ok"] else [reply["error"]] * len(msg["items"])
            for item, e in zip(msg["items"], results):
                if item[0] in (m.ITEM_COMMIT, m.ITEM_PREPARE):
                    entry = self.entries[tag_of(item[2], item[3])]
                    entry.answers[(s, "commit" if item[0] == m.ITEM_COMMIT else "prepare")] = outcome(e)
        elif msg["op"] == m.VALIDATE:
            entry = self.entries[tag_of(msg["reads"], [])]
            entry.answers[(s, "validate")] = outcome(None if reply["ok"] else reply["error"])

    # -- answers

    def on_entry_done(self, owner, index: int, result: dict) -> None:
        ctx = owner.req if owner.__class__ is BatchRun else owner
        entry = self.by_ctx[id(ctx)].entries[index]
        assert entry.result is None, f"entry {entry.tag} answered twice: {entry.result}, {result}"
        entry.result = result
        told = list(entry.answers.values())
        if result["ok"]:
            assert all(a == "ok" for a in told), (entry.tag, result, entry.answers)
            assert len(told) == len(entry.sent), f"entry {entry.tag} ok before every shard answered"
            if entry.writes:
                assert entry.sent and result["commit_ts"] == entry.ts, (result, entry.ts)
            else:
                assert result["commit_ts"] <= self.r.oracle.last
            return
        code = result["error"]["code"]
        if code == "conflict":
            if "conflict" in told:
                return
            # refused by the router: it reads a key an undecided 2PC txn writes
            assert entry.reads, f"blind write {entry.tag} answered conflict with no shard conflict"
            keys = result["error"]["keys"]
            assert keys and all(k in self.r.written_keys for k in keys), (keys, self.r.written_keys)
            assert set(keys) <= {k for k, _ in entry.reads}
            assert not entry.sent, f"entry {entry.tag} refused by the router after it was sent"
            entry.router_refused = True
        elif code == "unavailable":
            assert "lost" in told, (entry.tag, result, entry.answers)
        else:
            raise AssertionError(f"unexpected answer for entry {entry.tag}: {result}")

    def on_answer(self, ctx, fields: dict) -> None:
        req = self.by_ctx[id(ctx)]
        assert req.answer is None, f"request {ctx.id} answered twice: {req.answer}, {fields}"
        req.answer = fields
        if req.op == "flush":
            assert "error" in fields or fields["flush_ts"] <= self.r.oracle.last, fields
            return
        if req.op == "txn":
            (entry,) = req.entries
            if "error" in fields:
                assert entry.result == {"ok": False, "error": fields["error"]}
            else:
                assert entry.result == {"ok": True, "commit_ts": fields["commit_ts"]}
            return
        results = fields["results"]
        assert len(results) == len(req.entries), (len(results), len(req.entries))
        for entry, result in zip(req.entries, results):
            assert result is entry.result
        entries = req.entries
        for j, later in enumerate(entries):
            for earlier in entries[:j]:
                if earlier.result["ok"] and later.result["ok"] and earlier.keys & later.keys:
                    a, b = earlier.result["commit_ts"], later.result["commit_ts"]
                    assert a < b or (a == b and not later.writes), \
                        f"batch entries {earlier.index} and {later.index} share a key: commit_ts {a}, {b}"

    # -- invariants

    @invariant()
    def checks_hold(self):
        if self.r is None:
            return
        if self.errors:
            raise self.errors[0]
        self.busy = True
        self.tables_agree()
        self.busy = False

    def tables_agree(self):
        r = self.r
        undecided = [t for t in r.txns.values() if t.decision is None]
        assert r.undecided == len(undecided)
        held = {}
        for t in undecided:
            for reads, writes in t.keys.values():
                for k, _ in list(reads) + list(writes):
                    assert k not in held or held[k] is t, f"key {k} held by two undecided txns"
                    held[k] = t
        assert r.locked_keys == held
        written = {k: t for t in undecided for _, writes in t.keys.values() for k, _ in writes}
        assert r.written_keys == written
        for k in r.key_waiters:
            assert k in r.locked_keys, f"txns wait on {k}, which no undecided txn holds"
        for req in self.reqs:
            if req.answer is not None:
                assert all(e.result is not None for e in req.entries)

    def drain_and_check(self) -> None:
        """Answer everything (no loss, no conflict) until nothing moves, then check that
        nothing is left over."""
        for _ in range(10_000):
            self.send_all()
            live = [s for s in range(self.n) if self.inflight[s]]
            if not live:
                break
            for s in live:
                self.answer(s, False, lambda: False)
            if self.errors:
                raise self.errors[0]
            self.tables_agree()
        else:
            raise AssertionError("drain did not end")
        r = self.r
        unanswered = [(req.op, [e.tag for e in req.entries]) for req in self.reqs if req.answer is None]
        assert not unanswered, f"requests never answered: {unanswered}"
        assert r.locked_keys == {} and r.written_keys == {} and r.key_waiters == {}
        assert r.undecided == 0 and all(t.decision is not None for t in r.txns.values())
        assert r.pending == {} and all(not link.pending and not link.outbox for link in r.links)
        assert all(not held for held in self.held), self.held
        assert not r.held and not r.barriers


class CoordinatorMachinePyRouting(CoordinatorMachine):
    """The same, with node/routing.py's Python reference for the C helpers."""
    NAMES = {"first_locked": routing.py_first_locked, "lock_parts": routing.py_lock_parts,
             "unlock_parts": routing.py_unlock_parts, "route_batch": routing.py_route_batch}

    def __init__(self):
        self.saved = {name: getattr(coordinator, name) for name in self.NAMES}
        for name, fn in self.NAMES.items():
            setattr(coordinator, name, fn)
        super().__init__()

    def teardown(self):
        try:
            super().teardown()
        finally:
            for name, fn in self.saved.items():
                setattr(coordinator, name, fn)


SETTINGS = dict(stateful_step_count=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CoordinatorMachine.TestCase.settings = settings(max_examples=150, **SETTINGS)
test_coordinator_invariants = CoordinatorMachine.TestCase
CoordinatorMachinePyRouting.TestCase.settings = settings(max_examples=60, **SETTINGS)
test_coordinator_invariants_python_routing = CoordinatorMachinePyRouting.TestCase
