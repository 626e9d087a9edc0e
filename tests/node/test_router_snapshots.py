"""Snapshot reads (`get` and `scan` with `at`) against prunes and restarts, through a real
router and shard processes (the `cluster` fixture): the read horizon's two edges per
shard, that it and the tombstones survive a SIGKILL, and a paged scan that a prune passes
between two pages (README "Protocol choices")."""
from tests.node.test_router_ops import keys_on_each_shard


def code(reply: dict) -> str | None:
    return None if reply["ok"] else reply["error"]["code"]


def horizons(client) -> list[int]:
    return [s["horizon"] for s in client.ok("stats")["shards"]]


def test_the_horizon_per_shard_its_edges_and_a_tombstone_survive_a_restart(cluster):
    c = cluster.client()
    a, b = keys_on_each_shard()                      # a on shard 0, b on shard 1
    ts = [c.ok("txn", writes=[[a, b"%d" % i], [b, b"%d" % i]])["commit_ts"] for i in range(4)]
    gone = c.ok("txn", writes=[[a, None]])["commit_ts"]
    # nothing flushed: the prune drops versions in memory only (they are still in the log)
    assert c.ok("prune", keep_versions=2)["versions_removed"] == 3 + 2
    # a keeps ts[3] and its tombstone, b keeps ts[2] and ts[3]
    assert horizons(c) == [ts[3], ts[2]]

    def check():
        assert c.ok("get", keys=[a, b], at=ts[3])["values"] == [b"3", b"3"]
        assert code(c.call("get", keys=[a, b], at=ts[3] - 1)) == "too_old"
        assert code(c.call("scan", at=ts[3] - 1)) == "too_old"
        # a get reading only shard 1 goes down to that shard's own horizon, no further
        assert c.ok("get", keys=[b], at=ts[2])["values"] == [b"2"]
        assert code(c.call("get", keys=[b], at=ts[2] - 1)) == "too_old"
        got = c.ok("get", keys=[a, b], at=gone)
        assert got["values"] == [None, b"3"] and got["versions"] == [0, ts[3]]
        assert c.ok("scan", at=gone)["items"] == [[b, b"3", ts[3]]]
        assert c.ok("scan")["items"] == [[b, b"3", ts[3]]]
        assert [s["keys"] for s in c.ok("stats")["shards"]] == [0, 1]

    check()
    for shard in (0, 1):      # the log replays the dropped versions: the horizon must hold
        cluster.kill(shard)
        cluster.start_shard(shard)
    cluster.wait_all_shards_up()
    assert horizons(c) == [ts[3], ts[2]]
    check()
    c.ok("flush")             # the replayed versions are on disk now: pruned there too
    assert c.ok("prune", keep_versions=2)["versions_removed"] == 3 + 2
    check()


def test_a_paged_scan_that_a_prune_passes_answers_too_old_never_other_data(cluster):
    c = cluster.client()
    keys = [b"page/%02d" % i for i in range(10)]
    c.ok("txn", writes=[[k, b"old"] for k in keys])
    first = c.ok("scan", prefix=b"page/", limit=4)
    snapshot, cursor = first["ts"], first["items"][-1][0] + b"\x00"
    assert first["more"] and [k for k, _, _ in first["items"]] == keys[:4]
    for value in (b"new", b"newer"):
        c.ok("txn", writes=[[k, value] for k in keys])
    second = c.ok("scan", prefix=b"page/", start=cursor, limit=4, at=snapshot)
    assert [(k, v) for k, v, _ in second["items"]] == [(k, b"old") for k in keys[4:8]]
    c.ok("prune", keep_versions=1)
    third = c.call("scan", prefix=b"page/", start=second["items"][-1][0] + b"\x00", limit=4,
                   at=snapshot)
    assert code(third) == "too_old"
