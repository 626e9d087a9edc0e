"""The transaction coordinator of the router: single-shard commits, two-phase commit across
shards (prepare, decide, commit or abort, forget), `batch` dispatch in ts order, and the
barrier that flush and checkpoint create wait behind.

2PC: txn id = its ts T (unique, never reused). prepare(T) to all participants; all ok ->
commit_prepared to all, and the reply goes out at that decision: every participant holds
T prepared durably, so the recovery rule (node/recovery.py) can only commit it. An abort
that every participant may have prepared (a prepare result lost, a participant
restarted) is answered at the first abort_prepared ack instead. Forget once every
participant acked the commit.

TxnCoordinator is a part of node.router.Router (a mixin: it uses the router's links,
oracle, pending table and reply methods); it holds the txn logic only, the router the
loop, the sockets and the other ops. DESIGN.md "Transactions" gives the protocol and the
recovery rule that lets a cross-shard commit be answered at the decision.
"""
from __future__ import annotations

import collections
import sys
import time
import zlib
from typing import TYPE_CHECKING

from node.errors import err, shard_error, txn_error, txn_error_of, unavailable
from node.routing import first_locked, lock_parts, parts_by_shard, route_batch, unlock_parts
from shard import messages as m

if TYPE_CHECKING:
    from node.router import ShardLink


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
                 "abort_error", "keys")

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
        self.keys = ()                 # every key it reads or writes, locked until decided


class BatchRun:
    """A `batch` request being dispatched entry by entry (the owner of its entries)."""
    __slots__ = ("req", "txns", "count", "results", "next", "finished", "routes")

    def __init__(self, req, txns, routes=None):
        self.req = req
        self.txns = txns
        self.count = len(txns)
        self.results = [None] * len(txns)
        self.next = 0
        self.finished = 0
        # per entry: its shard, or {shard: (reads, writes)} (node/routing.route_batch);
        # only for a batch in which no key is in two entries (dispatch_unshared)
        self.routes = routes


class KeyWaiter:
    """A txn (or a batch stopped at an entry) waiting in the router for a held key:
    `resume(waiter)` tries it again, `fail(error)` answers it without ever sending it."""
    __slots__ = ("deadline", "resume", "fail")

    def __init__(self, deadline: float, resume, fail):
        self.deadline, self.resume, self.fail = deadline, resume, fail


class TxnCoordinator:
    """Txn and batch requests, 2PC and the barrier (a mixin of node.router.Router)."""

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
                        entry_done(owner, index, {"ok": False, "error": txn_error_of(e)})
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
        self.begin_txn(req, ctx, 0)

    # -- keys of undecided 2PC txns
    #
    # start_2pc holds every key of a cross-shard txn until its decision (locked_keys; the
    # written ones in written_keys too), and its shards hold them as prepare locks. A txn
    # that meets such a key at a shard is refused `conflict`. For one that reads a key
    # being written, that is its answer: the txn almost always commits, changing the
    # version read (begin_txn and dispatch_unshared answer it here, without a round
    # trip). Any other (a blind write, a read the undecided txn does not change, a write
    # on a key it only reads) would be refused although nothing it read had changed,
    # which PROTOCOL.md does not allow: it waits here for the decision, then goes out
    # behind the commit_prepared or abort_prepared (FIFO per shard) with a newer ts. So
    # no key is ever held by two undecided txns.

    def locked_key_of(self, t: dict):
        """A key of txn t that an undecided 2PC txn reads or writes, else None."""
        locked = self.locked_keys
        for k, _ in t["reads"]:
            if k in locked:
                return k
        for k, _ in t["writes"]:
            if k in locked:
                return k
        return None

    def doomed(self, t: dict) -> list:
        """The keys txn t reads that an undecided 2PC txn writes (its shard would answer
        `conflict` for them), else []."""
        written = self.written_keys
        return [k for k, _ in t["reads"] if k in written]

    def refuse_doomed(self, keys: list, owner, index: int) -> None:
        self.entry_done(owner, index, {"ok": False, "error": err(
            "conflict", "read versions changed or key locked", True, keys=keys)})

    def wait_for_key(self, key, waiter: KeyWaiter) -> None:
        """Resume the waiter once no undecided 2PC txn holds `key` (wake_waiters); fail
        it `unavailable` (aborted: it was never sent) past its deadline (expire_waiters)."""
        waiters = self.key_waiters.get(key)
        if waiters is None:
            self.key_waiters[key] = collections.deque((waiter,))
        else:
            waiters.append(waiter)

    def txn_waiter(self, t: dict, owner, index: int, deadline: float | None = None) -> KeyWaiter:
        return KeyWaiter(time.monotonic() + self.request_timeout if deadline is None else deadline,
                         lambda w: self.begin_txn(t, owner, index, w.deadline),
                         lambda error: self.entry_done(owner, index, {"ok": False, "error": error}))

    def batch_waiter(self, run: BatchRun) -> KeyWaiter:
        def fail(error):
            # the entries from the one that waited on were never sent; the earlier ones
            # finish as they do
            for i in range(run.next, run.count):
                self.entry_done(run, i, {"ok": False, "error": error})
            run.next = run.count
        return KeyWaiter(time.monotonic() + self.request_timeout, lambda w: self.pump_batch(run), fail)

    def expire_waiters(self, now: float, error: dict | None = None) -> None:
        """Fail the waiters past their deadline (every waiter with `error`, at a stop's)."""
        for key in list(self.key_waiters):
            queue = self.key_waiters[key]
            while queue and (error is not None or queue[0].deadline <= now):
                queue.popleft().fail(error or unavailable(
                    "waited too long for a cross-shard transaction on the same keys", outcome="aborted"))
            if not queue:
                del self.key_waiters[key]

    def unlock_keys(self, txn: TwoPC) -> None:
        """A 2PC txn was decided, and its commit_prepared or abort_prepared items are
        queued ahead of anything sent from here on: its keys are free again (start_2pc
        locked them; no key is ever held by two, since a txn touching a held key waits
        before it can become a 2PC txn itself)."""
        unlock_parts(self.locked_keys, self.written_keys, txn.keys)
        txn.keys = ()
        if self.key_waiters:
            self.wake_waiters()

    def wake_waiters(self) -> None:
        """Run the txns that waited on keys no longer held, in the order they came, each
        key's until one of them holds it again: the rest would only queue up again
        (waking them all made a queue of n cross-shard writes on one key cost n^2/2)."""
        locked, waiters = self.locked_keys, self.key_waiters
        for k in [k for k in waiters if k not in locked]:
            queue = waiters[k]
            while queue and k not in locked:
                waiter = queue.popleft()
                waiter.resume(waiter)
            if not queue and waiters.get(k) is queue:
                del waiters[k]

    def begin_txn(self, t: dict, owner, index: int, deadline: float | None = None) -> None:
        """start_txn, unless it meets a key of an undecided 2PC txn (see above): then
        `conflict` now when it reads a key being written, else once that one is decided
        (`deadline`: of its first wait, kept when it has to wait again)."""
        if self.locked_keys:
            key = self.locked_key_of(t)
            if key is not None:
                keys = self.doomed(t)
                if keys:
                    return self.refuse_doomed(keys, owner, index)
                return self.wait_for_key(key, self.txn_waiter(t, owner, index, deadline))
        self.start_txn(t, owner, index)

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
            # begin_txn: by the time the barrier lets it go, other txns may hold its keys
            self.held.append(lambda: self.begin_txn(t, owner, index))
            return None
        return self.start_2pc(parts, owner, index)

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
                        error = txn_error(reply)
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
        lock_parts(self.locked_keys, self.written_keys, parts, txn)   # until decide -> unlock_keys
        txn.keys = parts
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
                failure = shard_error({"error": e})
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
        if txn.keys:
            self.unlock_keys(txn)
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
        """Once every participant applied the commit, no recovery needs the txn's outcome
        records: each participant gets a forget, a down one when it is back (the records
        outlive a restart)."""
        txn.unacked.discard(shard)
        if not txn.unacked and self.txns.pop(txn.ts, None) is not None:
            for s in txn.participants:
                self.links[s].forgets.append(txn.ts)

    def op_batch(self, ctx, req):
        txns = req["txns"]
        if not txns:
            return self.reply(ctx, results=[])
        routes = route_batch(txns, self.nshards)      # None: some key is in two entries
        self.pump_batch(BatchRun(ctx, txns, routes=routes))

    def pump_batch(self, run: BatchRun) -> None:
        """Dispatch entries in list order; one that touches a key of an undecided 2PC txn
        (an earlier entry's, or another request's) stops the batch until that txn is
        decided, so every entry sees the effects of the earlier ones exactly (also when
        that txn aborts) and they get increasing commit_ts."""
        if run.routes is not None:
            return self.dispatch_unshared(run)
        while run.next < len(run.txns):
            t = run.txns[run.next]
            if self.locked_keys:
                key = self.locked_key_of(t)
                if key is not None:
                    return self.wait_for_key(key, self.batch_waiter(run))
            if self.barriers and self.is_cross_shard(t):
                self.held.append(lambda: self.pump_batch(run))
                return
            i = run.next
            run.next += 1
            self.start_txn(t, run, i)

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
        # The next entry that touches a key of another request's undecided 2PC txn (the
        # 2PC entries started below lock only their own keys, which no other entry of
        # this batch has): refused if it reads a key being written, else the batch waits
        # there (see "keys of undecided 2PC txns").
        locked = self.locked_keys
        stop = first_locked(txns, i, locked) if locked else -1
        while i < count:
            t = txns[i]
            if i == stop:
                keys = self.doomed(t)
                if not keys:
                    run.next = i
                    return self.wait_for_key(self.locked_key_of(t), self.batch_waiter(run))
                self.refuse_doomed(keys, run, i)
                i += 1
                stop = first_locked(txns, i, locked)
                continue
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
