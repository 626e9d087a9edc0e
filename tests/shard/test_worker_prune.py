"""Two prunes at once, through a real ShardWorker in this process (its RocksDB, its
message handlers, a stand-in peer that keeps the reply frames): a prune that asks for
another keep_versions than the running one runs after it, instead of joining it and
answering without its own keep applied."""
import time

import pytest

from shard import messages as m
from tests.shard.stand_in_peer import Peer


@pytest.fixture
def worker(booted_worker):
    return booted_worker({"flush": {"flush_on_start": False}, "prune": {"auto_interval_secs": 0},
                          "node": {"busy_poll_us": 0}})


def send(w, peer, rid, msg):
    msg.update(rid=rid, inc=w.inc)
    w.handle_frame(peer, m.pack(msg), time.monotonic())
    w.finish_pass()


def test_a_prune_with_another_keep_runs_after_the_running_one(worker):
    w, peer = worker, Peer()
    for ts in range(1, 7):                       # 6 versions of each of 3 keys
        send(w, peer, ts, {"op": m.TXNS, "items": [[m.ITEM_COMMIT, ts, [], [[b"k%d" % i, b"v%d" % ts]
                                                                            for i in range(3)]]]})
    send(w, peer, 10, {"op": m.PRUNE, "keep_versions": 3})    # starts a prune (keep 3)
    send(w, peer, 11, {"op": m.PRUNE, "keep_versions": 1})    # arrives while it runs
    send(w, peer, 12, {"op": m.PRUNE, "keep_versions": 3})    # the same keep: joins it
    assert w.prune_job is not None                             # still running
    for _ in range(1000):
        if w.prune_job is None:
            break
        w.maintenance_step()
        w.finish_pass()
    answers = {r["rid"]: r for r in peer.replies if r["rid"] >= 10}
    assert sorted(answers) == [10, 11, 12] and all(r["ok"] for r in answers.values())
    assert answers[10]["versions_removed"] == answers[12]["versions_removed"] == 3 * 3
    assert answers[11]["versions_removed"] == 3 * 2          # its own keep, applied after
    assert w.engine.read([b"k0"], 6) == [(b"v6", 6)]
    assert w.prune_queue == []
