"""A checker for list-append histories (after Jepsen's Elle): strict serializability in
commit_ts order, atomicity and snapshot reads, from what clients saw. No I/O: the
workload (tests/e2e/listappend_workload.py) records a History, check() judges it.

The workload. Every key's value is a list of unique elements (ints). A txn gets its keys
(values and versions), then sends a `txn` whose `reads` carry the version of every key
it read and whose `writes` set each key it appends to: the list it read + [its element].
Read-only txns append nothing. Snapshot reads (`get`, `scan`, with or without `at`) are
recorded too. At the end the final list of every key is read, and the walk down each
key's versions (a `get` at version - 1, recorded as reads) names the commit_ts of every
element, also of txns whose outcome the client never learnt.

Why this finds what totals do not: each element is written once, by one txn, so a list
says exactly which txns wrote the key and in which order, and a version says at which
commit_ts. A txn that reads keys it does not write (write skew) is judged by whether
some other txn wrote one of them between the read version and its commit_ts.

What check() reports (Anomaly.kind):
- "duplicate", "garbage", "misplaced": an element twice in a list, one that no txn
  wrote, one in a key its txn did not append to;
- "lost write": an acknowledged txn's element missing from a key it appended to;
- "aborted write visible": the element of a refused txn (conflict, or unavailable with
  outcome "aborted") anywhere;
- "partial txn": an unknown-outcome txn's element in some of its keys but not all;
- "not a prefix": a read list that is not a prefix of the key's final list;
- "lost update": a committed txn that read L and appended is not at position len(L);
- "version mismatch": two commit_ts for one element (the acknowledged one, a version
  read with the element last), a version that is not 0 for an empty list;
- "duplicate commit_ts": two writing txns with one commit_ts;
- "order": a key's final list not increasing in commit_ts;
- "stale read" (serializability): a committed txn read a key that another committed
  txn wrote between the version read and the reader's commit_ts (write skew is one);
- "snapshot read": a get/scan at ts S that misses an element committed at or below S,
  or shows one committed above S (a fractured read across shards is one);
- "real time": an op acknowledged before another was sent has a larger ts (ts(B) must
  be >= ts(A), and > when B writes);
- "batch order": entries of one batch that took effect out of list order.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

OK, REFUSED, UNKNOWN = "ok", "refused", "unknown"
INF = float("inf")


@dataclass
class Read:
    """One snapshot observation: a `get` or `scan` (also the one a txn starts with).
    `lists`: key -> (the list read, the version the node returned for it)."""
    name: str
    ts: int
    lists: dict
    at: int | None = None      # None: a read of the latest state (linearizable)
    sent: float = 0.0
    replied: float = 0.0


@dataclass
class Txn:
    """One transaction: its element, what it read (key -> (list, version)), the keys it
    appended its element to, and what the client learnt: outcome OK (commit_ts set),
    REFUSED (certainly no effect) or UNKNOWN (timeout, or unavailable with outcome
    unknown; replied is then inf). batch = (batch name, entry index) for batch entries."""
    name: str
    element: int
    reads: dict
    appends: list
    outcome: str
    commit_ts: int | None = None
    sent: float = 0.0
    replied: float = INF
    batch: tuple | None = None

    @property
    def writes(self) -> bool:
        return bool(self.appends)


@dataclass
class History:
    txns: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    final: dict = field(default_factory=dict)     # key -> final list (every key of the run)


@dataclass(frozen=True)
class Anomaly:
    kind: str
    ops: tuple       # names of the txns and reads involved
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message} [{', '.join(self.ops)}]"


def shown(lst: list, tail: int = 6) -> str:
    """A list for a message: whole when short, else its length and last elements."""
    if len(lst) <= tail + 2:
        return str(lst)
    return f"[...{len(lst) - tail} more, {', '.join(map(str, lst[-tail:]))}]"


def departure(lst: list, final: list) -> str:
    """Where a read list leaves its key's final list."""
    i = next((i for i, (a, b) in enumerate(zip(lst, final)) if a != b), min(len(lst), len(final)))
    got = lst[i] if i < len(lst) else "the end"
    want = final[i] if i < len(final) else "the end"
    return f"at index {i} it has {got} where the final list (length {len(final)}) has {want}"


class Checker:
    """check() in steps; each step appends what it finds to self.anomalies."""

    def __init__(self, history: History):
        self.h = history
        self.anomalies: list[Anomaly] = []
        self.reported = set()     # (kind, message): one report each
        self.by_element = {}
        self.ts_of = {}           # element -> commit_ts (acknowledged, or read as a version)
        self.ts_source = {}       # element -> the op that told it (for messages)
        self.position = {}        # key -> {element: index in the final list}

    def report(self, kind: str, ops, message: str) -> None:
        if (kind, message) not in self.reported:
            self.reported.add((kind, message))
            self.anomalies.append(Anomaly(kind, tuple(ops), message))

    def name(self, element) -> str:
        txn = self.by_element.get(element)
        return txn.name if txn is not None else f"element {element}"

    # -- the steps

    def run(self) -> list[Anomaly]:
        self.index_txns()
        self.check_final_lists()
        self.check_outcomes()
        self.learn_commit_ts()
        self.check_order()
        self.check_lost_updates()
        self.check_snapshot_reads()
        self.check_serializable()
        self.check_real_time()
        self.check_batch_order()
        return self.anomalies

    def index_txns(self) -> None:
        for txn in self.h.txns:
            if txn.element in self.by_element:
                self.report("duplicate", (txn.name, self.by_element[txn.element].name),
                            f"two txns use element {txn.element} (a workload bug)")
            self.by_element[txn.element] = txn

    def check_final_lists(self) -> None:
        for key, final in self.h.final.items():
            where = self.position[key] = {}
            for i, e in enumerate(final):
                txn = self.by_element.get(e)
                if e in where:
                    self.report("duplicate", (self.name(e),), f"{e} twice in {key!r}, at "
                                f"{where[e]} and {i}")
                    continue
                where[e] = i
                if txn is None:
                    self.report("garbage", (), f"{key!r} holds {e}, which no txn wrote")
                elif key not in txn.appends:
                    self.report("misplaced", (txn.name,), f"{key!r} holds {e}, but {txn.name} "
                                f"appended only to {txn.appends}")

    def present_in(self, txn: Txn) -> list:
        return [k for k in txn.appends if txn.element in self.position.get(k, {})]

    def check_outcomes(self) -> None:
        for txn in self.h.txns:
            if not txn.writes:
                continue
            present = self.present_in(txn)
            if txn.outcome == OK and len(present) < len(txn.appends):
                missing = [k for k in txn.appends if k not in present]
                self.report("lost write", (txn.name,), f"{txn.name} was acknowledged at ts "
                            f"{txn.commit_ts}, but its element {txn.element} is not in {missing}")
            elif txn.outcome == REFUSED and present:
                self.report("aborted write visible", (txn.name,), f"{txn.name} was refused, "
                            f"but its element {txn.element} is in {present}")
            elif txn.outcome == UNKNOWN and present and len(present) < len(txn.appends):
                missing = [k for k in txn.appends if k not in present]
                self.report("partial txn", (txn.name,), f"{txn.name} (outcome unknown) is in "
                            f"{present} but not in {missing}")

    def committed(self, txn: Txn) -> bool:
        """Took effect: acknowledged, or an unknown one whose element is in the state."""
        if txn.outcome == OK:
            return True
        return txn.outcome == UNKNOWN and txn.writes and bool(self.present_in(txn))

    def observations(self):
        """(op name, key, list, version) for every list read, by reads and by txns."""
        for r in self.h.reads:
            for key, (lst, version) in r.lists.items():
                yield r.name, key, lst, version
        for txn in self.h.txns:
            for key, (lst, version) in txn.reads.items():
                yield txn.name, key, lst, version

    def learn_ts(self, element, ts: int, source: str) -> None:
        known = self.ts_of.get(element)
        if known is None:
            self.ts_of[element] = ts
            self.ts_source[element] = source
        elif known != ts:
            self.report("version mismatch", (self.name(element), self.ts_source[element], source),
                        f"{self.name(element)} has commit_ts {known} by {self.ts_source[element]} "
                        f"and {ts} by {source}")

    def learn_commit_ts(self) -> None:
        for txn in self.h.txns:
            if txn.outcome == OK and txn.writes:
                self.learn_ts(txn.element, txn.commit_ts, txn.name)
        for name, key, lst, version in self.observations():
            final = self.h.final.get(key, [])
            if lst != final[:len(lst)]:
                self.report("not a prefix", (name,), f"{name} read {key!r} = {shown(lst)}: "
                            f"{departure(lst, final)}")
            if lst:
                self.learn_ts(lst[-1], version, name)
            elif version != 0:
                self.report("version mismatch", (name,), f"{name} read {key!r} empty at version {version}")
        owners = {}
        for e, ts in self.ts_of.items():
            if ts in owners:
                self.report("duplicate commit_ts", (self.name(e), self.name(owners[ts])),
                            f"{self.name(e)} and {self.name(owners[ts])} both have commit_ts {ts}")
            owners[ts] = e

    def check_order(self) -> None:
        """Each key's final list increasing in commit_ts; and per key the prefix max and
        suffix min of the known commit_ts, which the read checks use."""
        self.prefix_max, self.suffix_min = {}, {}   # key -> [(ts, element)] per prefix length
        for key, final in self.h.final.items():
            last = None
            pmax = [(0, None)]       # pmax[p]: the largest known ts among final[:p]
            for e in final:
                ts = self.ts_of.get(e)
                best = pmax[-1]
                if ts is not None:
                    if last is not None and ts <= last[0]:
                        self.report("order", (self.name(last[1]), self.name(e)),
                                    f"in {key!r}, {self.name(e)} (ts {ts}) comes after "
                                    f"{self.name(last[1])} (ts {last[0]})")
                    last = (ts, e)
                    if ts > best[0]:
                        best = (ts, e)
                pmax.append(best)
            smin = [(INF, None)] * (len(final) + 1)     # smin[p]: the smallest among final[p:]
            for i in range(len(final) - 1, -1, -1):
                ts = self.ts_of.get(final[i])
                smin[i] = smin[i + 1] if ts is None or ts >= smin[i + 1][0] else (ts, final[i])
            self.prefix_max[key], self.suffix_min[key] = pmax, smin

    def check_lost_updates(self) -> None:
        for txn in self.h.txns:
            if not self.committed(txn):
                continue
            for key in txn.appends:
                if key not in txn.reads:
                    continue
                lst = txn.reads[key][0]
                at = self.position.get(key, {}).get(txn.element)
                if at is not None and at != len(lst):
                    final = self.h.final[key]
                    self.report("lost update", (txn.name,), f"{txn.name} read {key!r} = {shown(lst)} "
                                f"and appended {txn.element}, which is at index {at} of "
                                f"{shown(final[:at + 1])}")

    def check_snapshot_reads(self) -> None:
        """A read at S of a list of length p: the first p elements committed at or below
        S, the rest above S."""
        for r in self.h.reads:
            for key, (lst, _) in r.lists.items():
                p = len(lst)
                if key not in self.prefix_max or p >= len(self.prefix_max[key]):
                    continue      # not a prefix: reported
                ts, e = self.prefix_max[key][p]
                if ts > r.ts:
                    self.report("snapshot read", (r.name, self.name(e)), f"{r.name} at ts {r.ts} "
                                f"saw {self.name(e)} (ts {ts}) in {key!r}")
                ts, e = self.suffix_min[key][p]
                if ts <= r.ts:
                    self.report("snapshot read", (r.name, self.name(e)), f"{r.name} at ts {r.ts} "
                                f"missed {self.name(e)} (ts {ts}) in {key!r}: read {shown(lst)}")

    def commit_point(self, txn: Txn):
        if txn.outcome == OK:
            return txn.commit_ts
        return self.ts_of.get(txn.element)

    def check_serializable(self) -> None:
        """Each committed txn read, for every key, the latest state before its commit_ts
        (at or below it, for a read-only txn, whose commit_ts is its snapshot)."""
        for txn in self.h.txns:
            if not self.committed(txn):
                continue
            c = self.commit_point(txn)
            if c is None:
                continue
            for key, (lst, version) in txn.reads.items():
                final = self.h.final.get(key, [])
                p = len(lst)
                if lst != final[:p]:
                    continue      # not a prefix: reported
                if version > c or (txn.writes and version == c):
                    self.report("stale read", (txn.name,), f"{txn.name} (ts {c}) read {key!r} at "
                                f"version {version}, not before its commit_ts")
                own = p < len(final) and final[p] == txn.element
                ts, e = self.suffix_min[key][p + 1 if own else p]
                if ts < c or (ts == c and not txn.writes):
                    self.report("stale read", (txn.name, self.name(e)),
                                f"{txn.name} (ts {c}) read {key!r} = {shown(lst)} at version {version}, "
                                f"but {self.name(e)} wrote it at ts {ts}")

    def timed_ops(self):
        """(name, ts, writes, sent, replied) of every op that has a ts in real time."""
        for txn in self.h.txns:
            c = self.commit_point(txn) if self.committed(txn) else None
            if c is not None:
                yield txn.name, c, txn.writes, txn.sent, txn.replied
        for r in self.h.reads:
            if r.at is None:
                yield r.name, r.ts, False, r.sent, r.replied

    def check_real_time(self) -> None:
        """If A was acknowledged before B was sent: ts(B) >= ts(A), and > when B writes."""
        ops = list(self.timed_ops())
        done = sorted((op for op in ops if op[4] < INF), key=lambda op: op[4])
        replied = [op[4] for op in done]
        best = []      # best[i]: the op with the largest ts among done[:i + 1]
        for op in done:
            best.append(op if not best or op[1] > best[-1][1] else best[-1])
        for name, ts, writes, sent, _ in ops:
            i = bisect.bisect_left(replied, sent)
            if i == 0:
                continue
            a = best[i - 1]
            if ts < a[1] or (writes and ts == a[1]):
                self.report("real time", (a[0], name), f"{a[0]} (ts {a[1]}) was acknowledged "
                            f"before {name} was sent, but {name} has ts {ts}")

    def check_batch_order(self) -> None:
        batches = {}
        for txn in self.h.txns:
            if txn.batch is not None and txn.outcome == OK:
                batches.setdefault(txn.batch[0], []).append(txn)
        for entries in batches.values():
            entries.sort(key=lambda t: t.batch[1])
            for a, b in zip(entries, entries[1:]):
                if b.commit_ts < a.commit_ts or (b.writes and b.commit_ts == a.commit_ts):
                    self.report("batch order", (a.name, b.name), f"batch entry {b.name} (ts "
                                f"{b.commit_ts}) after {a.name} (ts {a.commit_ts})")


def check(history: History) -> list[Anomaly]:
    """Every anomaly of the history (empty when it is strictly serializable as far as
    these checks see)."""
    return Checker(history).run()
