"""Behaviour of the batched hot path (router `txns` messages, the dispatch of batches
whose entries share no key, piggybacked forgets) through real router + shard processes.
No timing: only what a client and a shard can observe."""
import os
import time

from node.router import shard_of
from shard import messages as m
from shard.link import FrameClient


def pairs_across_shards(n, shards=2, prefix="t"):
    """n disjoint (a, b) key pairs, a on shard 0 and b on shard 1 (cross-shard txns)."""
    by_shard = {s: [] for s in range(shards)}
    i = 0
    while min(len(v) for v in by_shard.values()) < n:
        key = f"{prefix}{i}".encode()
        by_shard[shard_of(key, shards)].append(key)
        i += 1
    return list(zip(by_shard[0][:n], by_shard[1][:n]))


def test_unshared_batch_mixes_single_and_cross_shard_entries_in_list_order(cluster):
    c = cluster.client()
    pairs = pairs_across_shards(40)
    c.ok("batch", txns=[{"writes": [[a, b"100"], [b, b"100"]]} for a, b in pairs])
    got = c.ok("get", keys=[k for pair in pairs for k in pair])
    txns = []
    for i, (a, b) in enumerate(pairs):
        va, vb = got["versions"][2 * i], got["versions"][2 * i + 1]
        if i % 3 == 0:      # single-shard entry (only a)
            txns.append({"reads": [[a, va]], "writes": [[a, b"99"]]})
        elif i == 7:        # stale read version: this entry alone conflicts
            txns.append({"reads": [[a, va - 1], [b, vb]], "writes": [[a, b"x"], [b, b"x"]]})
        else:               # cross-shard transfer
            txns.append({"reads": [[a, va], [b, vb]], "writes": [[a, b"99"], [b, b"101"]]})
    results = c.ok("batch", txns=txns)["results"]
    assert len(results) == len(pairs)
    assert [i for i, r in enumerate(results) if not r["ok"]] == [7]
    assert results[7]["error"]["code"] == "conflict" and results[7]["error"]["retryable"]
    stamps = [r["commit_ts"] for r in results if r["ok"]]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)   # list order
    after = c.ok("get", keys=[k for pair in pairs for k in pair])
    for i, (a, b) in enumerate(pairs):
        va, vb = after["values"][2 * i], after["values"][2 * i + 1]
        if i == 7:
            assert (va, vb) == (b"100", b"100")       # nothing of the conflicting entry
        elif i % 3 == 0:
            assert (va, vb) == (b"99", b"100")
        else:
            assert (va, vb) == (b"99", b"101")
            assert after["versions"][2 * i] == after["versions"][2 * i + 1] == results[i]["commit_ts"]


def test_outcome_records_are_forgotten_without_further_txn_traffic(cluster):
    """Forgets ride along with other frames (at the latest the pings): the outcome records
    of committed cross-shard txns go away even when no client request follows."""
    c = cluster.client()
    pairs = pairs_across_shards(20, prefix="f")
    results = c.ok("batch", txns=[{"writes": [[a, b"1"], [b, b"1"]]} for a, b in pairs])["results"]
    txn_ids = [r["commit_ts"] for r in results]      # a 2PC txn's id is its commit_ts
    for s in range(2):
        sock = FrameClient(os.path.join(cluster.run_dir, f"shard-{s}.sock"))
        try:
            inc = None
            outcomes = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:   # poll the condition until the deadline
                if inc is None:
                    sock.send(m.pack({"op": m.PING, "rid": 1}))
                else:
                    sock.send(m.pack({"op": m.RECOVER_INFO, "rid": 2, "inc": inc,
                                      "txns": txn_ids}))
                if not sock.poll(50):
                    continue
                reply = m.unpack(sock.recv())
                if reply.get("rid") != (1 if inc is None else 2):
                    continue                      # a late answer to an earlier try
                if inc is None:
                    inc = reply["inc"]
                    continue
                outcomes = reply["outcomes"]
                if not outcomes:
                    break
                time.sleep(0.02)
            assert outcomes == {}, f"shard {s} still holds outcome records {sorted(outcomes)[:5]}"
        finally:
            sock.close()


def test_txns_message_answers_each_item_and_rejects_a_stale_incarnation(cluster):
    """The shard side of `txns`: one result per item in order, a bad item does not stop
    the others, and a message for another incarnation executes nothing."""
    sock = FrameClient(os.path.join(cluster.run_dir, "shard-0.sock"))
    try:
        def call(msg):
            sock.send(m.pack(msg))
            assert sock.poll(10_000)
            return m.unpack(sock.recv())
        pong = call({"op": m.PING, "rid": 1})
        inc, ts = pong["inc"], pong["max_ts"]
        key = next(k for k in (f"w{i}".encode() for i in range(100)) if shard_of(k, 2) == 0)
        stale = call({"op": m.TXNS, "rid": 2, "inc": "not-this-one",
                      "items": [[m.ITEM_COMMIT, ts + 1_000_000, [], [[key, b"no"]]]]})
        assert not stale["ok"] and stale["error"]["code"] == m.STALE_INC
        reply = call({"op": m.TXNS, "rid": 3, "inc": inc, "items": [
            [m.ITEM_COMMIT, ts + 1_000_001, [], [[key, b"v1"]]],
            [99, 1],                                              # unknown kind
            [m.ITEM_COMMIT],                                      # too short
            [m.ITEM_COMMIT, ts + 1_000_002, [[key, 1]], [[key, b"v2"]]],   # stale read
        ]})
        assert reply["ok"] and reply["rid"] == 3
        results = reply["results"]
        assert results[0] is None
        assert results[1]["code"] == "bad_request" and results[2]["code"] == "bad_request"
        assert results[3]["code"] == "conflict" and results[3]["keys"] == [key]
        read = call({"op": m.READ, "rid": 4, "inc": inc, "keys": [key], "at": ts + 1_000_002})
        assert read["values"] == [b"v1"] and read["versions"] == [ts + 1_000_001]
    finally:
        sock.close()
