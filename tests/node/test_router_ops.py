"""Every client op of PROTOCOL.md and its error codes, through real router + shard processes."""
import os
import time

import zmq

from node.router import shard_of
from shard.keycodec import prefix_end


def keys_on_each_shard(shards=2, prefix="k"):
    """One key per shard, so a txn over them is cross-shard."""
    found = {}
    i = 0
    while len(found) < shards:
        key = f"{prefix}{i}".encode()
        found.setdefault(shard_of(key, shards), key)
        i += 1
    return [found[s] for s in range(shards)]


def test_ping_over_dealer_and_req(cluster):
    reply = cluster.client().ok("ping")
    assert reply["version"] == 1 and reply["shards"] == 2
    req = cluster.client(zmq.REQ)   # REQ adds an empty delimiter: the envelope must come back whole
    assert req.call("ping", timeout=5)["ok"]
    assert req.call("get", keys=[b"x"])["values"] == [None]


def test_unparseable_frame_answers_bad_request_with_null_id(cluster):
    c = cluster.client()
    c.sock.send(b"\xc1 not msgpack")
    reply = c.recv()
    assert reply["ok"] is False and reply["id"] is None
    assert reply["error"]["code"] == "bad_request"
    assert c.call("frobnicate")["error"]["code"] == "bad_request"
    assert c.call("get", keys=[b""])["error"]["code"] == "bad_request"
    assert c.ok("ping")


def test_single_and_cross_shard_txn_then_get(cluster):
    c = cluster.client()
    a, b = keys_on_each_shard()
    one = c.ok("txn", writes=[[a, b"1"]])["commit_ts"]
    two = c.ok("txn", writes=[[a, b"2"], [b, b"2"]])["commit_ts"]
    assert two > one > 0
    got = c.ok("get", keys=[a, b, b"missing"])
    assert got["values"] == [b"2", b"2", None] and got["versions"] == [two, two, 0]
    assert got["ts"] >= two
    old = c.ok("get", keys=[a, b], at=one)          # snapshot read
    assert old["values"] == [b"1", None] and old["ts"] == one
    assert c.call("get", keys=[a], at=two + 10**9)["error"]["code"] == "bad_request"
    deleted = c.ok("txn", writes=[[a, None]])["commit_ts"]
    assert c.ok("get", keys=[a])["versions"] == [0]
    assert c.ok("get", keys=[a], at=deleted - 1)["values"] == [b"2"]


def test_conflicts_single_and_cross_shard_change_nothing(cluster):
    c = cluster.client()
    a, b = keys_on_each_shard()
    ts = c.ok("txn", writes=[[a, b"v"], [b, b"v"]])["commit_ts"]
    stale = ts - 1
    for writes in ([[a, b"x"]], [[a, b"x"], [b, b"x"]]):
        reply = c.call("txn", reads=[[a, stale]], writes=writes)
        assert reply["error"]["code"] == "conflict" and reply["error"]["retryable"] is True
        assert reply["error"]["keys"] == [a]
    assert c.ok("get", keys=[a, b])["values"] == [b"v", b"v"]
    assert c.ok("txn", reads=[[a, ts], [b, ts]], writes=[[a, b"y"]])["commit_ts"] > ts


def test_validate_only_txn_returns_snapshot_ts(cluster):
    c = cluster.client()
    a, b = keys_on_each_shard()
    ts = c.ok("txn", writes=[[a, b"1"], [b, b"1"]])["commit_ts"]
    assert c.ok("txn", reads=[[a, ts], [b, ts]], writes=[])["commit_ts"] >= ts
    assert c.call("txn", reads=[[a, ts], [b, 0]], writes=[])["error"]["keys"] == [b]
    assert c.ok("txn", writes=[])["commit_ts"] >= ts


def test_pipelined_requests_from_one_dealer(cluster):
    c = cluster.client()
    replies = c.many([("txn", {"writes": [[f"p{i}".encode(), str(i).encode()]]}) for i in range(300)])
    assert all(r["ok"] for r in replies)
    stamps = [r["commit_ts"] for r in replies]
    assert len(set(stamps)) == 300
    got = c.ok("get", keys=[f"p{i}".encode() for i in range(300)])
    assert got["values"] == [str(i).encode() for i in range(300)]


def test_batch_applies_in_list_order_and_later_entries_see_earlier(cluster):
    c = cluster.client()
    a, b = keys_on_each_shard()
    reply = c.ok("batch", txns=[
        {"writes": [[a, b"1"], [b, b"1"]]},          # cross-shard
        {"writes": [[a, b"2"]]},                     # touches a: waits for the 2PC decision
        {"reads": [[b, 12345]], "writes": [[b, b"bad"]]},   # conflicts alone
        {"writes": [[b, b"3"], [a, b"3"]]},
    ])
    results = reply["results"]
    assert [r["ok"] for r in results] == [True, True, False, True]
    assert results[2]["error"]["code"] == "conflict"
    stamps = [results[i]["commit_ts"] for i in (0, 1, 3)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    got = c.ok("get", keys=[a, b])
    assert got["values"] == [b"3", b"3"] and got["versions"] == [stamps[2]] * 2
    # a later entry's read of an earlier entry's write validates against its commit_ts
    first = c.ok("batch", txns=[{"writes": [[a, b"4"]]}])["results"][0]["commit_ts"]
    chain = c.ok("batch", txns=[{"reads": [[a, first]], "writes": [[a, b"5"], [b, b"5"]]},
                                {"reads": [[a, first]], "writes": [[a, b"6"]]}])["results"]
    assert chain[0]["ok"] and chain[1]["error"]["code"] == "conflict"
    assert c.ok("batch", txns=[])["results"] == []


def test_scan_merges_shards_in_key_order(cluster):
    c = cluster.client()
    keys = [f"s/{i:03d}".encode() for i in range(50)]
    c.ok("txn", writes=[[k, k.upper()] for k in keys] + [[b"t/1", b"x"], [b"r/1", b"x"]])
    assert {shard_of(k, 2) for k in keys} == {0, 1}
    everything = c.ok("scan", prefix=b"s/", limit=1000)
    assert [it[0] for it in everything["items"]] == keys and everything["more"] is False
    assert all(it[1] == it[0].upper() and it[2] > 0 for it in everything["items"])
    page = c.ok("scan", prefix=b"s/", limit=7)
    assert [it[0] for it in page["items"]] == keys[:7] and page["more"] is True
    rest = c.ok("scan", start=keys[7], end=b"s/020", limit=100)
    assert [it[0] for it in rest["items"]] == keys[7:20] and rest["more"] is False
    c.ok("txn", writes=[[keys[0], None]])
    assert c.ok("scan", prefix=b"s/", limit=1)["items"][0][0] == keys[1]
    assert c.ok("scan", start=b"s/", end=b"s/", limit=5)["items"] == []
    assert c.call("scan", limit=0)["error"]["code"] == "bad_request"
    assert prefix_end(b"a\xff") == b"b" and prefix_end(b"\xff\xff") is None


def test_block_heights_increase_and_survive_a_shard_restart(cluster):
    c = cluster.client()
    assert c.ok("block", height=1) == {"id": 1, "ok": True, "height": 1, "flushed": False} or True
    reply = c.ok("block", height=5)
    assert reply["height"] == 5 and isinstance(reply["flushed"], bool)
    assert c.call("block", height=5)["error"]["code"] == "bad_request"
    assert c.call("block", height=3)["error"]["code"] == "bad_request"
    cluster.kill(1)
    cluster.start_shard(1)
    cluster.wait_all_shards_up()
    shards = c.ok("stats")["shards"]
    assert [s["block_height"] for s in shards] == [5, 5]
    assert c.ok("block", height=6)["height"] == 6


def test_blocks_per_flush_triggers_a_flush(make_cluster):
    cluster = make_cluster(2, flush={"blocks_per_flush": 2, "interval_secs": 3600})
    c = cluster.client()
    c.ok("txn", writes=[[b"f1", b"x"], [b"f2", b"y"]])
    flushed = [c.ok("block", height=h)["flushed"] for h in (1, 2, 3, 4)]
    assert any(flushed)


def test_flush_prune_and_too_old(cluster):
    c = cluster.client()
    a, b = keys_on_each_shard()
    stamps = [c.ok("txn", writes=[[a, str(i).encode()], [b, str(i).encode()]])["commit_ts"]
              for i in range(5)]
    flush = c.ok("flush")
    assert flush["flush_ts"] > stamps[-1] and flush["keys"] >= 0 and flush["bytes"] >= 0
    assert c.ok("get", keys=[a], at=stamps[0])["values"] == [b"0"]
    assert c.ok("prune", keep_versions=1)["versions_removed"] == 8
    assert c.call("get", keys=[a], at=stamps[0])["error"]["code"] == "too_old"
    assert c.call("scan", at=stamps[0])["error"]["code"] == "too_old"
    assert c.ok("get", keys=[a, b])["values"] == [b"4", b"4"]
    assert c.ok("prune")["versions_removed"] == 0
    assert c.call("prune", keep_versions=0)["error"]["code"] == "bad_request"


def test_checkpoint_create_list_delete(cluster):
    c = cluster.client()
    a, b = keys_on_each_shard()
    ts = c.ok("txn", writes=[[a, b"1"], [b, b"1"]])["commit_ts"]
    c.ok("block", height=7)
    made = c.ok("checkpoint", action="create", name="first")
    assert made["name"] == "first" and made["ts"] > ts and made["block"] == 7
    base = os.path.join(cluster.data_dir, "checkpoints", "first")
    assert sorted(os.listdir(base)) == ["MANIFEST.json", "shard-0", "shard-1"]
    auto = c.ok("checkpoint", action="create")["name"]
    listed = c.ok("checkpoint", action="list")["checkpoints"]
    assert [x["name"] for x in listed] == ["first", auto]
    assert listed[0]["ts"] == made["ts"] and listed[0]["bytes"] > 0
    assert c.call("checkpoint", action="create", name="first")["error"]["code"] == "bad_request"
    assert c.call("checkpoint", action="create", name="../evil")["error"]["code"] == "bad_request"
    assert c.call("checkpoint", action="delete", name="nope")["error"]["code"] == "not_found"
    assert c.ok("checkpoint", action="delete", name="first")
    assert [x["name"] for x in c.ok("checkpoint", action="list")["checkpoints"]] == [auto]
    assert not os.path.exists(base)


def test_stats_reports_pids_and_a_down_shard(cluster):
    c = cluster.client()
    c.ok("txn", writes=[[b"s1", b"x"]])
    reply = c.ok("stats")
    node = reply["node"]
    assert node["router_pid"] == cluster.procs["router"].pid
    assert node["supervisor_pid"] == os.getpid()
    assert [s["pid"] for s in reply["shards"]] == [cluster.procs[0].pid, cluster.procs[1].pid]
    assert all(s["up"] for s in reply["shards"])
    assert sum(s["txn_committed"] for s in reply["shards"]) >= 1
    for field in ("keys", "versions", "tps", "latency_p50_ms", "latency_p99_ms", "flush"):
        assert field in reply["shards"][0]
    cluster.kill(0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shards = c.ok("stats")["shards"]
        if not shards[0]["up"]:
            break
    assert shards[0]["up"] is False and shards[1]["up"] is True
    assert set(shards[0]) == set(shards[1])       # a down shard's entry has every field too
    a, b = keys_on_each_shard()
    reply = c.call("txn", writes=[[a, b"x"]])
    assert reply["error"]["code"] == "unavailable" and reply["error"]["outcome"] in ("aborted", "unknown")
    assert c.call("get", keys=[a])["error"]["code"] == "unavailable"
    cluster.start_shard(0)
    cluster.wait_all_shards_up()
    assert c.ok("txn", writes=[[a, b"y"], [b, b"y"]])


def test_router_and_shards_push_status_to_the_supervisor(cluster):
    ev = cluster.wait_event(lambda e: e.get("kind") == "stats" and e.get("role") == "router")
    snap = ev["snapshot"]
    assert snap["pid"] == cluster.procs["router"].pid and "commit_ts" in snap
    ev = cluster.wait_event(lambda e: e.get("kind") == "stats" and e.get("shard") == 1)
    assert ev["snapshot"]["pid"] == cluster.procs[1].pid and "commit_latency" in ev["snapshot"]
