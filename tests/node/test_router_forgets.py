"""Outcome records are forgotten on every participant in the end, whatever fails between a
commit and its forget. A shard keeps a committed cross-shard txn's outcome record (in
memory and as a durable meta row) until the router's `forget`; a forget that never comes
leaves it there, and the router's TwoPC with it, until the next router start.

Driven in process (the `inproc_router` fixture): shard messages are read from what the
router sends and answered by hand, so each interleaving is exact."""
import zlib

import pytest

from node.coordinator import BatchRun
from node.routing import parts_by_shard
from shard import messages as m


class CapturingConn:
    """Stands in for a shard connection: keeps every frame the router sends."""

    def __init__(self):
        self.frames = []
        self.forgot = set()          # every txn a forget sent here named, over the test

    def send(self, frame: bytes) -> bool:
        msg = m.unpack(frame)
        self.frames.append(msg)
        for sub in msg["msgs"] if msg.get("op") == m.MULTI else [msg]:
            if sub["op"] == m.FORGET:
                self.forgot.update(sub.get("txns", []))
        return True

    def sync_poller(self, poller) -> None:
        pass

    def messages(self) -> list:
        out = []
        for frame in self.frames:
            out.extend(frame["msgs"] if frame.get("op") == m.MULTI else [frame])
        self.frames = []
        return out


@pytest.fixture
def router(inproc_router):
    r = inproc_router
    r.answers = []
    r.reply = lambda ctx, **fields: r.answers.append(fields["results"][0])
    r.poller = None
    r.ready = True                  # booted: a shard coming up is not the node's first
    for link in r.links:
        link.conn = CapturingConn()
    return r


def start_transfer(r):
    """A cross-shard txn (one write on each shard) as entry 0 of a one-entry batch."""
    keys = [next(k for k in (b"k%d" % i for i in range(100)) if zlib.crc32(k) % 2 == s) for s in (0, 1)]
    writes = [(k, b"v") for k in keys]
    run = BatchRun(req=object(), txns=[{"reads": [], "writes": writes}])
    return r.start_2pc(parts_by_shard([], writes, [], [0, 1]), run, 0)


def sent(r, shard: int) -> list:
    """Send what the router queued (one loop pass's flush) and return shard's messages."""
    r.flush_outboxes()
    return r.links[shard].conn.messages()


def answer(r, msg: dict, **fields) -> None:
    r.complete(msg["rid"], {"rid": msg["rid"], "ok": True, **fields})


def commit_everywhere_but_lose_shard1s_ack(r):
    """T prepared and decided commit on both shards; shard 0 acks its commit_prepared,
    shard 1's ack is lost (after shard 1 applied it)."""
    txn = start_transfer(r)
    r.flush_outboxes()
    for s in (0, 1):
        (prepare,) = r.links[s].conn.messages()
        answer(r, prepare, results=[None])
    assert r.answers == [{"ok": True, "commit_ts": txn.ts}]
    r.flush_outboxes()
    (commit0,) = r.links[0].conn.messages()
    (commit1,) = r.links[1].conn.messages()
    assert commit1["items"] == [[m.ITEM_COMMIT_PREPARED, txn.ts, txn.ts]]
    answer(r, commit0, results=[None])
    return txn, commit1


def resolve(r, shard: int, inc: str, prepared: list) -> None:
    """Shard answers pings again (inc: same or new incarnation); answer its recover_info."""
    r.on_pong(r.links[shard], {"ok": True, "inc": inc, "max_ts": 0})
    (info,) = [msg for msg in sent(r, shard) if msg["op"] == m.RECOVER_INFO]
    answer(r, info, prepared=prepared, outcomes={})
    assert r.links[shard].state == "up"


def forgotten(r, shard: int) -> set:
    """Txns the shard was sent forgets for so far, once traffic goes its way again."""
    r.send(r.links[shard], {"op": m.PING}, lambda reply: None)
    sent(r, shard)
    return r.links[shard].conn.forgot


@pytest.mark.parametrize("inc", ["inc-1", "inc-1-restarted"], ids=["went-silent", "restarted"])
def test_a_commit_applied_whose_ack_was_lost_is_forgotten_once_the_shard_is_resolved(router, inc):
    """Shard 1 applied commit_prepared(T), then went silent past shard_timeout (same
    incarnation) or was killed before its ack went out (a new one): either way the link
    fails, and once resolved the shard no longer lists T as prepared. T was applied there,
    so it is done: it leaves the router and both shards forget it."""
    txn, _ = commit_everywhere_but_lose_shard1s_ack(router)
    router.fail_link(router.links[1], "shard 1 did not answer pings")
    resolve(router, 1, inc, prepared=[])
    assert txn.ts not in router.txns
    assert txn.ts in forgotten(router, 0) and txn.ts in forgotten(router, 1)


def test_a_commit_still_prepared_on_the_resolved_shard_is_sent_again_then_forgotten(router):
    """The lost ack's commit_prepared never ran (the shard died first): the shard still
    lists T as prepared, so resolution commits it there, and only that ack finishes T."""
    txn, _ = commit_everywhere_but_lose_shard1s_ack(router)
    router.fail_link(router.links[1], "shard 1 connection closed")
    router.on_pong(router.links[1], {"ok": True, "inc": "inc-1-restarted", "max_ts": 0})
    (info,) = [msg for msg in sent(router, 1) if msg["op"] == m.RECOVER_INFO]
    answer(router, info, prepared=[{"txn": txn.ts, "ts": txn.ts, "participants": [0, 1]}], outcomes={})
    assert txn.ts in router.txns                      # not done until shard 1 applied it
    (commit,) = [msg for msg in sent(router, 1) if msg["op"] == m.COMMIT_PREPARED]
    assert (commit["txn"], commit["ts"]) == (txn.ts, txn.ts)
    answer(router, commit)
    assert router.links[1].state == "up" and txn.ts not in router.txns
    assert txn.ts in forgotten(router, 0) and txn.ts in forgotten(router, 1)


def test_forgets_wait_while_a_shard_is_down_and_go_once_it_is_back(router):
    """Every participant acked T, so its forgets are queued (they ride with later
    traffic). Shard 0 is declared down before they go: they must wait for it, not be
    dropped, since a restarted shard still holds the records."""
    txn, commit1 = commit_everywhere_but_lose_shard1s_ack(router)
    answer(router, commit1, results=[None])
    assert txn.ts not in router.txns
    router.fail_link(router.links[0], "shard 0 did not answer pings")
    assert txn.ts not in forgotten(router, 0)         # down: nothing goes there
    resolve(router, 0, "inc-0", prepared=[])
    assert txn.ts in forgotten(router, 0)
    assert txn.ts in forgotten(router, 1)


def test_the_last_ack_arriving_while_a_participant_is_down_still_forgets_there(router):
    txn, commit1 = commit_everywhere_but_lose_shard1s_ack(router)
    router.links[0].state = "down"                    # failed after acking its commit
    answer(router, commit1, results=[None])
    assert txn.ts not in router.txns
    resolve(router, 0, "inc-0", prepared=[])
    assert txn.ts in forgotten(router, 0)


@pytest.mark.parametrize("failure", [
    m.error(None, "unavailable", "connection closed", True, lost=True),
    m.error(None, m.STALE_INC, "message for another shard incarnation", True),
], ids=["lost", "restarted"])
def test_a_forget_that_did_not_arrive_goes_again(router, failure):
    txn, commit1 = commit_everywhere_but_lose_shard1s_ack(router)
    answer(router, commit1, results=[None])
    router.send(router.links[1], {"op": m.PING}, lambda reply: None)
    (forget,) = [msg for msg in sent(router, 1) if msg["op"] == m.FORGET]
    router.links[1].conn.forgot.clear()
    router.complete(forget["rid"], {**failure, "rid": forget["rid"]})
    assert txn.ts in forgotten(router, 1)


def test_a_forget_the_shard_refused_as_malformed_is_not_repeated(router):
    """Only a forget that may not have arrived goes again: one the shard answered with an
    error of its own would fail the same way forever."""
    txn, commit1 = commit_everywhere_but_lose_shard1s_ack(router)
    answer(router, commit1, results=[None])
    router.send(router.links[1], {"op": m.PING}, lambda reply: None)
    (forget,) = [msg for msg in sent(router, 1) if msg["op"] == m.FORGET]
    router.links[1].conn.forgot.clear()
    router.complete(forget["rid"], m.error(forget["rid"], "bad_request", "malformed forget"))
    assert txn.ts not in forgotten(router, 1)
