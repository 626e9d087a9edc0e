"""Shard recovery in the router: when a shard comes up (at the router's start, after a
restart, or back from silence) its prepared txns are resolved before it gets any other
message. The rule (DESIGN.md "Transactions"): a prepared txn commits iff some participant
has an outcome record for it or every participant holds it prepared; else it aborts.

ShardRecovery is a part of node.router.Router (a mixin: it uses the router's links,
txns and send/scatter).
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from node.errors import unavailable
from shard import messages as m

if TYPE_CHECKING:
    from node.router import ShardLink


class ShardRecovery:
    """Resolve a shard's in-doubt txns, then mark it up (a mixin of node.router.Router)."""

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
        # A txn decided commit that this shard has not acked, and no longer holds prepared,
        # was applied there: the shard acked its prepare durably, and nothing aborts a txn
        # decided commit. Its commit ack was lost (the connection dropped, or the shard
        # went silent or died after applying it); without this the txn stayed in
        # self.txns and its outcome records were never forgotten.
        index = link.index
        for known in [t for t in self.txns.values()
                      if t.decision == "commit" and index in t.unacked and t.ts not in prepared]:
            self.commit_acked(known, index)
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
                # A read-only shard (disk full) cannot apply it until space is back: it
                # serves reads meanwhile (router.ShardLink.readable); retried every pong.
                link.readable = bool((reply.get("error") or {}).get("read_only"))
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
        link.readable = False
        if all(l.state == "up" for l in self.links):
            if self.recovered_commits:   # no shard holds them prepared any more
                txns = sorted(self.recovered_commits)
                self.recovered_commits.clear()
                for l in self.links:
                    self.send(l, {"op": m.FORGET, "txns": txns}, lambda reply: None)
            if not self.ready:
                self.become_ready()
