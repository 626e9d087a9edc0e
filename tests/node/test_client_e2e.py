"""The client library against a real node (router + shard worker processes, the
`cluster` fixture of tests/node/conftest.py): every op, the typed errors, the
transaction context manager, pipelining and snapshot paging."""
import threading

import pytest

from node.client import (BadRequest, Client, Conflict, NotFound, TooLarge, TooOld,
                         Transaction)

pytestmark = pytest.mark.e2e


@pytest.fixture
def kv(cluster):
    with Client(cluster.endpoint, timeout=10) as client:
        yield client


def test_ping_put_get_delete(kv):
    assert kv.ping()["version"] == 1
    ts1 = kv.put(b"k1", b"v1")
    ts2 = kv.put("k2", "v2")          # str is sent as UTF-8
    assert 0 < ts1 < ts2
    got = kv.get([b"k1", b"k2", b"missing"])
    assert got.values == [b"v1", b"v2", None] and got.versions == [ts1, ts2, 0]
    assert got.ts >= ts2
    ts3 = kv.delete(b"k1")
    assert ts3 > ts2
    assert kv.get(b"k1").version == 0 and kv.get(b"k1").value is None
    # a read at an older snapshot still sees the deleted value
    assert kv.get(b"k1", at=ts2).value == b"v1"


def test_txn_conflict_names_the_keys_and_writes_nothing(kv):
    ts = kv.txn(writes={b"a": b"1", b"b": b"1"})
    kv.put(b"a", b"2")                     # a's version moves on
    with pytest.raises(Conflict) as info:
        kv.txn(reads={b"a": ts, b"b": ts}, writes={b"a": b"3", b"c": b"3"})
    assert info.value.keys == [b"a"] and info.value.retryable
    assert kv.get([b"a", b"c"]).values == [b"2", None]


def test_transaction_context_manager_commits_reads_and_writes(kv):
    kv.txn(writes={b"alice": b"100", b"bob": b"0"})
    with kv.transaction() as tx:
        a, b = (int(v) for v in tx.get_many([b"alice", b"bob"]))
        tx.put(b"alice", str(a - 30))
        tx.put(b"bob", str(b + 30))
        assert tx.get(b"alice") == b"70"          # reads its own writes
    assert tx.commit_ts is not None
    got = kv.get([b"alice", b"bob"])
    assert got.values == [b"70", b"30"] and got.versions == [tx.commit_ts] * 2


def test_transaction_conflicts_when_a_read_key_changed(kv, cluster):
    kv.put(b"counter", b"0")
    with Client(cluster.endpoint) as other:
        with pytest.raises(Conflict):
            with kv.transaction() as tx:
                value = int(tx.get(b"counter"))
                other.put(b"counter", b"41")      # a concurrent writer wins
                tx.put(b"counter", str(value + 1))
    assert kv.get(b"counter").value == b"41"


def test_transaction_body_exception_commits_nothing(kv):
    with pytest.raises(RuntimeError):
        with kv.transaction() as tx:
            tx.put(b"never", b"x")
            raise RuntimeError("abort")
    assert kv.get(b"never").version == 0


def test_run_transaction_retries_conflicts_from_concurrent_increments(kv, cluster):
    kv.put(b"n", b"0")
    per_thread, threads = 15, 3

    def increment(tx: Transaction):
        tx.put(b"n", str(int(tx.get(b"n")) + 1))

    def worker():
        with Client(cluster.endpoint, timeout=10) as c:
            for _ in range(per_thread):
                c.run_transaction(increment, attempts=100, backoff=0.002)
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert kv.get(b"n").value == str(per_thread * threads).encode()


def test_run_transaction_runs_again_when_a_prune_passed_its_snapshot(kv, cluster):
    """A transaction's later reads are at the snapshot of its first one; a prune that
    passes it (an auto-prune on a busy node) makes the next read too_old. Nothing was
    written, so run_transaction runs fn again at a new snapshot: it raised TooOld."""
    kv.txn(writes={b"rt/a": b"1", b"rt/b": b"2"})
    runs = []
    with Client(cluster.endpoint, timeout=10) as other:
        def add(tx: Transaction):
            runs.append(tx)
            a = int(tx.get(b"rt/a"))
            if len(runs) == 1:       # between the first run's reads: b moves on, a prune passes
                other.put(b"rt/b", b"3")
                other.put(b"rt/b", b"4")
                other.prune(keep_versions=1)
            tx.put(b"rt/sum", str(a + int(tx.get(b"rt/b"))))
        kv.run_transaction(add, attempts=3, backoff=0.001)
    assert len(runs) == 2 and runs[1].snapshot > runs[0].snapshot
    assert kv.get(b"rt/sum").value == b"5"
    with pytest.raises(TooOld) as info:      # the same read, as a request, stays too_old
        kv.get(b"rt/b", at=runs[0].snapshot)
    assert not info.value.retryable


def test_batch_results_in_order_and_later_entries_see_earlier(kv):
    results = kv.batch([{"writes": {b"x": b"1"}},
                        {"reads": {b"x": 0}, "writes": {b"y": b"1"}},     # x exists now: conflict
                        {"writes": {b"x": b"2", b"y": b"2"}}])
    assert isinstance(results[0], int) and isinstance(results[2], int)
    assert isinstance(results[1], Conflict) and results[1].keys == [b"x"]
    assert results[0] < results[2]
    assert kv.get([b"x", b"y"]).values == [b"2", b"2"]


def test_pipeline_many_writes_then_scan_sees_them_in_order(kv):
    results = kv.pipeline([("txn", {"writes": [[b"p/%03d" % i, b"%d" % i]]}) for i in range(300)])
    assert all(isinstance(r, dict) and r["commit_ts"] > 0 for r in results)
    page = kv.scan(prefix=b"p/", limit=10)
    assert [k for k, _, _ in page.items] == [b"p/%03d" % i for i in range(10)] and page.more
    rest = kv.scan(start=b"p/290", end=b"p/295")
    assert [v for _, v, _ in rest.items] == [b"290", b"291", b"292", b"293", b"294"]
    assert not rest.more


def test_scan_iter_pages_through_one_snapshot(kv):
    kv.txn(writes=[(b"s/%03d" % i, b"old") for i in range(250)])
    items = kv.scan_iter(prefix=b"s/", page=40)
    first = [next(items) for _ in range(50)]
    kv.txn(writes=[(b"s/%03d" % i, b"new") for i in range(250)] + [(b"s/999", b"new")])
    everything = first + list(items)
    assert [k for k, _, _ in everything] == [b"s/%03d" % i for i in range(250)]
    assert {v for _, v, _ in everything} == {b"old"}


def test_bad_and_oversized_requests_raise_typed_errors(kv):
    with pytest.raises(BadRequest):
        kv.put(b"", b"v")
    with pytest.raises(TooLarge):
        kv.put(b"k", b"v" * 100_001)
    with pytest.raises(TooLarge):
        kv.get([b"k" * 10_001])
    with pytest.raises(BadRequest):
        kv.checkpoint_create("../escape")
    with pytest.raises(BadRequest):
        kv.call("nope")


def test_block_flush_prune_and_too_old(kv):
    kv.block(1)
    assert kv.block(2)["height"] == 2
    with pytest.raises(BadRequest):
        kv.block(2)                          # heights must increase
    first = kv.put(b"h", b"1")
    kv.put(b"h", b"2")
    kv.put(b"h", b"3")
    flushed = kv.flush()
    assert flushed["flush_ts"] >= first
    assert kv.prune(keep_versions=1) >= 2
    with pytest.raises(TooOld):
        kv.get(b"h", at=first)
    assert kv.get(b"h").value == b"3"


def test_checkpoint_create_list_delete(kv):
    kv.put(b"c", b"1")
    made = kv.checkpoint_create("cp-1")
    assert made["name"] == "cp-1" and made["ts"] > 0
    auto = kv.checkpoint_create()
    listed = {c["name"]: c for c in kv.checkpoint_list()}
    assert {"cp-1", auto["name"]} <= set(listed) and listed["cp-1"]["ts"] == made["ts"]
    kv.checkpoint_delete("cp-1")
    assert "cp-1" not in {c["name"] for c in kv.checkpoint_list()}
    with pytest.raises(NotFound):
        kv.checkpoint_delete("cp-1")


def test_stats_has_node_and_every_shard(kv):
    stats = kv.stats()
    assert stats["node"]["router_pid"] > 0
    assert sorted(s["shard"] for s in stats["shards"]) == [0, 1]
    assert all(s["pid"] > 0 for s in stats["shards"])
