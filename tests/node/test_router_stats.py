"""The node row of `stats`: each transaction counted once, latency end to end."""
import time
import zlib


def keys_on(shard: int, count: int, prefix: bytes) -> list[bytes]:
    found = (prefix + b"%d" % i for i in range(10_000))
    return [k for k in found if zlib.crc32(k) % 2 == shard][:count]


def test_node_figures_count_cross_shard_transactions_once(cluster):
    client = cluster.client()
    (a,), (b,) = keys_on(0, 1, b"a"), keys_on(1, 1, b"b")
    for i in range(5):                      # cross-shard: touches both shards
        client.ok("txn", writes=[[a, b"%d" % i], [b, b"%d" % i]])
    stale = client.call("txn", reads=[[a, 1]], writes=[[a, b"x"]])
    assert stale["error"]["code"] == "conflict"
    results = client.ok("batch", txns=[{"writes": [[a, b"y"]]}, {"reads": [[b, 1]], "writes": [[b, b"z"]]}])
    assert [r["ok"] for r in results["results"]] == [True, False]

    node = client.ok("stats")["node"]
    assert (node["txn_committed"], node["txn_conflict"], node["txn_error"]) == (6, 2, 0)
    assert abs(node["success_rate"] - 6 / 8) < 1e-9
    assert node["tps"] > 0
    assert 0 < node["latency_p50_ms"] <= node["latency_p90_ms"] <= node["latency_p99_ms"]


def test_stats_report_pruning_per_shard(cluster):
    client = cluster.client()
    keys = [b"pr-%d" % i for i in range(6)]
    for round_ in range(4):
        client.ok("batch", txns=[{"writes": [[k, b"%d" % round_]]} for k in keys])
    removed = client.ok("prune", keep_versions=1)["versions_removed"]
    assert removed == 3 * len(keys)
    shards = client.ok("stats")["shards"]
    assert sum(s["prune"]["versions_removed"] for s in shards) == removed
    assert all(s["prune"]["prune_count"] >= 1 for s in shards)


def test_the_outcome_records_of_committed_cross_shard_txns_are_all_forgotten(cluster):
    """Each participant keeps a committed cross-shard txn's outcome record until every
    participant applied the commit; the forgets then ride with the next traffic (pings at
    the latest), so a quiet node holds none. `stats` shows them per shard."""
    client = cluster.client()
    (a,), (b,) = keys_on(0, 1, b"o"), keys_on(1, 1, b"p")
    client.ok("batch", txns=[{"writes": [[a, b"%d" % i], [b, b"%d" % i]]} for i in range(20)])
    deadline = time.monotonic() + 10
    while True:
        shards = client.ok("stats")["shards"]
        held = [(s["prepared"], s["outcomes"]) for s in shards]
        if held == [(0, 0), (0, 0)] or time.monotonic() > deadline:
            break
        time.sleep(0.05)           # polls the condition; the forgets go with pings (0.2 s)
    assert held == [(0, 0), (0, 0)]
    assert all(s["txn_committed"] >= 20 for s in shards)
