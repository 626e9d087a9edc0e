"""When the router answers a cross-shard txn, driven in process: a Router with two shard
links marked up, its shard messages read from the outboxes and answered by hand (no
shard processes), so each case is exact. The rule behind every case: the client hears
"committed" only when recovery can only commit (every participant holds the txn
prepared), and "aborted" only when recovery can only abort (some participant lacks it)."""
import zlib

import pytest

from node.coordinator import BatchRun
from node.router import Router
from node.routing import parts_by_shard
from shard import messages as m


@pytest.fixture
def router(inproc_router):
    r = inproc_router
    r.answers = []
    r.reply = lambda ctx, **fields: r.answers.append(fields["results"][0])
    return r


def start_transfer(r: Router):
    """A cross-shard txn (one write on each shard) as entry 0 of a one-entry batch."""
    keys = [next(k for k in (b"k%d" % i for i in range(100)) if zlib.crc32(k) % 2 == s) for s in (0, 1)]
    writes = [(k, b"v") for k in keys]
    run = BatchRun(req=object(), txns=[{"reads": [], "writes": writes}])
    parts = parts_by_shard([], writes, [], [zlib.crc32(k) % 2 for k in keys])
    return r.start_2pc(parts, run, 0)


def take(r: Router, shard: int) -> dict:
    """The `txns` message the router queued for a shard (the step items of this pass)."""
    msg = r.links[shard].outbox.pop()
    r.links[shard].group = None
    assert msg["op"] == m.TXNS
    return msg


def answer(r: Router, msg: dict, results: list) -> None:
    r.complete(msg["rid"], {"rid": msg["rid"], "ok": True, "results": results})


def lose(r: Router, msg: dict) -> None:
    """The shard's answer never comes (its connection dropped after it may have run it)."""
    r.complete(msg["rid"], m.error(msg["rid"], "unavailable", "connection closed", True, lost=True))


CONFLICT = {"code": "conflict", "message": "read versions changed", "retryable": True, "keys": [b"k"]}


def test_a_commit_is_answered_at_the_decision_before_any_commit_ack(router):
    txn = start_transfer(router)
    prepares = [take(router, s) for s in (0, 1)]
    assert [msg["items"][0][0] for msg in prepares] == [m.ITEM_PREPARE] * 2
    answer(router, prepares[0], [None])
    assert router.answers == []                      # one participant has not prepared yet
    answer(router, prepares[1], [None])
    assert router.answers == [{"ok": True, "commit_ts": txn.ts}]
    commits = [take(router, s) for s in (0, 1)]
    assert [msg["items"] for msg in commits] == [[[m.ITEM_COMMIT_PREPARED, txn.ts, txn.ts]]] * 2
    answer(router, commits[0], [None])
    lose(router, commits[1])                         # the answer stands: recovery commits it
    assert len(router.answers) == 1
    assert txn.ts in router.txns                     # kept until shard 1 is resolved


def test_an_abort_after_a_refusal_is_answered_at_once(router):
    start_transfer(router)
    prepares = [take(router, s) for s in (0, 1)]
    answer(router, prepares[0], [None])
    answer(router, prepares[1], [CONFLICT])          # shard 1 never prepared it
    assert len(router.answers) == 1 and router.answers[0]["error"]["code"] == "conflict"
    aborts = [take(router, s) for s in (0, 1)]
    assert all(msg["items"][0][0] == m.ITEM_ABORT_PREPARED for msg in aborts)


def test_an_abort_every_participant_may_have_prepared_waits_for_an_abort_ack(router):
    """Shard 1's prepare result is lost: it may hold the txn prepared, as shard 0 does,
    and then a new router would commit it. "aborted" goes out only once a participant
    has dropped it."""
    start_transfer(router)
    prepares = [take(router, s) for s in (0, 1)]
    answer(router, prepares[0], [None])
    lose(router, prepares[1])
    assert router.answers == []
    aborts = [take(router, s) for s in (0, 1)]
    lose(router, aborts[1])
    assert router.answers == []
    answer(router, aborts[0], [None])
    assert len(router.answers) == 1
    error = router.answers[0]["error"]
    assert error["code"] == "unavailable" and error["outcome"] == "aborted"


def test_an_abort_no_participant_acknowledged_has_an_unknown_outcome(router):
    start_transfer(router)
    prepares = [take(router, s) for s in (0, 1)]
    lose(router, prepares[0])
    answer(router, prepares[1], [None])
    aborts = [take(router, s) for s in (0, 1)]
    lose(router, aborts[0])
    lose(router, aborts[1])
    assert len(router.answers) == 1
    error = router.answers[0]["error"]
    assert error["code"] == "unavailable" and error["outcome"] == "unknown"
