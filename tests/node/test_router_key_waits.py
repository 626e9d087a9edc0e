"""A txn that touches a key of an undecided 2PC txn waits in the router for its decision,
then runs behind it: a blind write, or a read the undecided txn does not change, is never
refused `conflict` (PROTOCOL.md: only a read version that no longer matches is). Before,
it went on to the shard, which refused it because the key was locked by the prepare.
The in-process router: its shard messages are read from the links' outboxes and answered
by hand, so each interleaving is exact. tests/e2e/test_protocol_conformance.py checks the
same from outside, against a real node."""
import time
import zlib

import pytest

from node.coordinator import BatchRun
from node.router import Request
from shard import messages as m


def key_on(shard: int, tag: str) -> bytes:
    return next(k for k in (f"{tag}{i}".encode() for i in range(1000)) if zlib.crc32(k) % 2 == shard)


A0, A1, B0, C1, D1 = key_on(0, "a"), key_on(1, "a"), key_on(0, "b"), key_on(1, "c"), key_on(1, "d")


@pytest.fixture
def router(inproc_router):
    r = inproc_router
    r.answers = []
    r.reply = lambda ctx, **fields: r.answers.append((ctx, fields))
    r.fail = lambda ctx, error: r.answers.append((ctx, {"error": error}))
    return r


def txn(r, reads=(), writes=()):
    ctx = Request([b"client"], len(r.answers), "txn", 0.0)
    r.op_txn(ctx, {"reads": [list(p) for p in reads], "writes": [list(p) for p in writes]})
    return ctx


def batch(r, entries):
    ctx = Request([b"client"], "batch", "batch", 0.0)
    r.op_batch(ctx, {"txns": [{"reads": [list(p) for p in reads], "writes": [list(p) for p in writes]}
                              for reads, writes in entries]})
    return ctx


def take(r, shard: int) -> dict | None:
    """The `txns` message queued for a shard since the last take, or None."""
    link = r.links[shard]
    if not link.outbox:
        return None
    msg = link.outbox.pop()
    assert not link.outbox
    link.group = None
    return msg


def answer_all(r, msg) -> None:
    r.complete(msg["rid"], {"rid": msg["rid"], "ok": True, "results": [None] * len(msg["items"])})


def kinds(msg) -> list:
    return [item[0] for item in msg["items"]]


def prepare_transfer(r):
    """A cross-shard write of A0 and A1, prepared on both shards, undecided."""
    txn(r, writes=[(A0, b"x"), (A1, b"x")])
    prepares = take(r, 0), take(r, 1)
    assert [kinds(p) for p in prepares] == [[m.ITEM_PREPARE]] * 2
    return prepares


def test_a_blind_write_on_a_prepared_key_waits_for_the_decision_then_commits_behind_it(router):
    r = router
    p0, p1 = prepare_transfer(r)
    ts_2pc = p0["items"][0][1]
    txn(r, writes=[(A0, b"blind")])                     # would meet the prepared lock on shard 0
    txn(r, writes=[(B0, b"free")])                      # touches no locked key: goes at once
    free = take(r, 0)
    assert kinds(free) == [m.ITEM_COMMIT] and free["items"][0][3] == [[B0, b"free"]]
    answer_all(r, p0)
    assert take(r, 0) is None                           # still undecided: nothing more sent
    answer_all(r, p1)                                   # decided: commit
    after = take(r, 0)
    assert kinds(after) == [m.ITEM_COMMIT_PREPARED, m.ITEM_COMMIT]   # the decision first
    blind = after["items"][1]
    assert blind[3] == [[A0, b"blind"]] and blind[1] > ts_2pc
    assert r.locked_keys == {} and r.key_waiters == {}


def test_an_abort_frees_the_keys_too(router):
    r = router
    p0, p1 = prepare_transfer(r)
    txn(r, writes=[(A1, b"w"), (C1, b"v")])            # writes a key the 2PC txn writes
    assert take(r, 1) is None
    answer_all(r, p0)
    r.complete(p1["rid"], {"rid": p1["rid"], "ok": True, "results": [
        {"code": "conflict", "message": "read versions changed", "retryable": True, "keys": [A1]}]})
    after = take(r, 1)
    assert kinds(after) == [m.ITEM_ABORT_PREPARED, m.ITEM_COMMIT]
    assert r.locked_keys == r.written_keys == r.key_waiters == {}


def test_a_read_of_a_key_being_written_is_conflict_at_once_without_a_round_trip(router):
    """Its shard would refuse it for the prepare lock, and the undecided txn almost always
    commits, changing the version read: it is answered here, and a batch goes on past it."""
    r = router
    p0, p1 = prepare_transfer(r)
    single = txn(r, reads=[(A0, 3)], writes=[(B0, b"x")])
    ctx, fields = r.answers[-1]
    assert ctx is single and fields["error"]["code"] == "conflict" and fields["error"]["keys"] == [A0]
    batch(r, [((), [(B0, b"1")]),
              (((A1, 3),), [(C1, b"2")]),              # reads a key being written: refused
              ((), [(D1, b"3")])])                      # goes on (no key in two entries)
    s0, s1 = take(r, 0), take(r, 1)
    assert [item[3] for item in s0["items"]] == [[[B0, b"1"]]]
    assert [item[3] for item in s1["items"]] == [[[D1, b"3"]]]
    answer_all(r, s0)
    answer_all(r, s1)
    ctx, fields = r.answers[-1]
    assert [res["ok"] for res in fields["results"]] == [True, False, True]
    assert fields["results"][1]["error"]["code"] == "conflict"
    answer_all(r, p0)
    answer_all(r, p1)
    assert r.locked_keys == r.written_keys == {}


def test_a_batch_stops_at_an_entry_on_a_locked_key_and_keeps_its_order(router):
    r = router
    p0, p1 = prepare_transfer(r)
    batch(r, [((), [(B0, b"1")]),                        # free: dispatched
              ((), [(A0, b"2")]),                        # locked: the batch stops here
              ((), [(C1, b"3")])])                       # free, but after the held one
    first = take(r, 0)
    assert [item[3] for item in first["items"]] == [[[B0, b"1"]]]
    assert take(r, 1) is None
    answer_all(r, p0)
    answer_all(r, p1)
    s0, s1 = take(r, 0), take(r, 1)
    assert kinds(s0) == [m.ITEM_COMMIT_PREPARED, m.ITEM_COMMIT]
    assert kinds(s1) == [m.ITEM_COMMIT_PREPARED, m.ITEM_COMMIT]
    held, last = s0["items"][1], s1["items"][1]
    assert held[3] == [[A0, b"2"]] and last[3] == [[C1, b"3"]]
    assert first["items"][0][1] < held[1] < last[1]      # commit_ts in list order


def test_a_batch_entry_waits_on_an_earlier_cross_shard_entry_of_the_same_batch(router):
    r = router
    batch(r, [((), [(A0, b"1"), (A1, b"1")]),             # cross-shard: 2PC
              ((), [(A0, b"2")])])                        # the same key: waits for entry 0
    p0, p1 = take(r, 0), take(r, 1)
    assert kinds(p0) == [m.ITEM_PREPARE] and kinds(p1) == [m.ITEM_PREPARE]
    answer_all(r, p0)
    answer_all(r, p1)
    s0 = take(r, 0)
    assert kinds(s0) == [m.ITEM_COMMIT_PREPARED, m.ITEM_COMMIT]
    answer_all(r, s0)
    answer_all(r, take(r, 1))
    (ctx, fields), = r.answers
    assert [res["ok"] for res in fields["results"]] == [True, True]


def test_keys_held_by_a_txn_whose_prepare_reply_is_lost_are_freed_at_its_abort(router):
    r = router
    p0, p1 = prepare_transfer(r)
    waiting = txn(r, writes=[(A1, b"w")])
    answer_all(r, p0)
    r.complete(p1["rid"], m.error(p1["rid"], "unavailable", "connection closed", True))
    after = take(r, 1)
    assert kinds(after) == [m.ITEM_ABORT_PREPARED, m.ITEM_COMMIT]
    answer_all(r, after)
    assert any(ctx is waiting and "commit_ts" in fields for ctx, fields in r.answers)
    assert r.locked_keys == {} and r.key_waiters == {}


def test_a_freed_key_wakes_its_waiters_only_until_one_holds_it_again(router):
    """n cross-shard writes queued on the same keys: each decision starts the next one, and
    the others stay queued without being tried again (waking every waiter at each decision
    cost n^2/2 tries: 8,000 queued writes took 77 s)."""
    r = router
    tries = []
    begin = r.begin_txn
    r.begin_txn = lambda *args: (tries.append(args[1:3]), begin(*args))[1]
    n = 40
    for i in range(n + 1):
        txn(r, writes=[(A0, b"%d" % i), (A1, b"%d" % i)])
    started = 0
    for _ in range(n + 1):
        p0, p1 = take(r, 0), take(r, 1)
        assert kinds(p0)[-1] == m.ITEM_PREPARE      # behind the previous one's commit_prepared
        started += 1
        answer_all(r, p0)
        answer_all(r, p1)
    assert started == n + 1 and r.key_waiters == {} and r.locked_keys == {}
    assert len(tries) <= 2 * (n + 1)                  # its own try, and one when woken
    assert sum(1 for _, fields in r.answers if "commit_ts" in fields) == n + 1


def test_a_waiter_past_its_deadline_is_answered_aborted_and_never_sent(router):
    r = router
    p0, p1 = prepare_transfer(r)
    waiting = txn(r, writes=[(A0, b"late")])
    batch(r, [((), [(B0, b"1")]), ((), [(A1, b"2")]), ((), [(C1, b"3")])])
    assert kinds(take(r, 0)) == [m.ITEM_COMMIT]      # the batch's first entry went
    r.expire_waiters(time.monotonic() + r.request_timeout + 1)       # as run_timers does
    errors = {id(ctx): fields for ctx, fields in r.answers}
    assert errors[id(waiting)]["error"]["code"] == "unavailable"
    assert errors[id(waiting)]["error"]["outcome"] == "aborted"
    assert r.key_waiters == {}
    answer_all(r, p0)
    answer_all(r, p1)
    assert kinds(take(r, 0)) == [m.ITEM_COMMIT_PREPARED]      # nothing of the waiters
    assert kinds(take(r, 1)) == [m.ITEM_COMMIT_PREPARED]


def test_at_a_stop_every_waiter_is_answered(router):
    from node.errors import unavailable
    r = router
    prepare_transfer(r)
    waiting = [txn(r, writes=[(A0, b"%d" % i)]) for i in range(5)]
    r.expire_waiters(time.monotonic(), unavailable("the node is stopping", outcome="aborted"))
    answered = [ctx for ctx, fields in r.answers if fields.get("error", {}).get("outcome") == "aborted"]
    assert answered == waiting and r.key_waiters == {}
