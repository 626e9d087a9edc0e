"""A real shard worker process against a second peer on its socket (beside the router)
that sends what no router would: every message is answered, the process stays up (the
same pid, no restart), and the node goes on serving through the router. Each message
here used to end the shard (exit 1) or, for the block height, its next status push."""
import math

from shard import messages as m
from shard.link import FrameClient

HOSTILE = [
    {"op": []},                                                    # unhashable op
    {"op": {"x": 1}},
    {"op": m.MULTI, "msgs": [{"op": ["read"], "rid": 1}]},
    {"op": m.COMMIT, "ts": 1e30, "reads": [], "writes": [[b"h", b"v"]]},   # float ts
    {"op": m.PREPARE, "txn": 1e30, "ts": 1e30, "reads": [], "writes": [[b"h", b"v"]],
     "participants": [0]},
    {"op": m.BLOCK, "height": 1e30},                               # float block height
    {"op": m.READ, "keys": [b"h"], "at": math.inf},
]


def test_hostile_messages_on_the_shard_socket_leave_it_serving(make_cluster):
    cluster = make_cluster(1)
    shard = cluster.procs[0]
    client = cluster.client()
    assert client.ok("txn", writes=[[b"k", b"1"]])
    peer = FrameClient(f"{cluster.run_dir}/shard-0.sock")
    peer.send(m.pack({"op": m.PING, "rid": 0}))
    inc = m.unpack(peer.recv())["inc"]
    answers = []
    for rid, msg in enumerate(HOSTILE, start=1):
        peer.send(m.pack({**msg, "rid": rid, "inc": inc}))
        answers.extend(m.replies_of(m.unpack(peer.recv())))
    assert [a["ok"] for a in answers] == [False] * len(HOSTILE)
    assert {a["error"]["code"] for a in answers} == {"bad_request"}

    # Its next status push (it carries the block height) arrives from the same process,
    # and the node goes on serving through the router.
    mark = len(cluster.events)
    cluster.wait_event(lambda e: e.get("kind") == "stats" and e.get("pid") == shard.pid, since=mark)
    version = client.ok("get", keys=[b"k"])["versions"][0]
    client.ok("txn", reads=[[b"k", version]], writes=[[b"k", b"2"]])
    assert client.ok("get", keys=[b"k", b"h"])["values"] == [b"2", None]

    # A read with no rid, deferred on a key a prepared txn holds, then unblocked (last:
    # this prepare's ts is above the router's, which it would then refuse).
    ts = client.ok("ping")["ts"] + 1000
    peer.send(m.pack({"op": m.TXNS, "rid": 50, "inc": inc,
                      "items": [[m.ITEM_PREPARE, ts, [], [[b"p", b"v"]], [0]]]}))
    assert m.unpack(peer.recv())["results"] == [None]
    peer.send(m.pack({"op": m.READ, "keys": [b"p"], "at": ts, "inc": inc}))
    peer.send(m.pack({"op": m.ABORT_PREPARED, "rid": 51, "txn": ts, "inc": inc}))
    peer.send(m.pack({"op": m.PING, "rid": 52}))
    replies = []
    while len(replies) < 3:
        replies.extend(m.replies_of(m.unpack(peer.recv())))
    assert sorted(replies, key=lambda r: r.get("rid") or 0)[0]["error"]["code"] == "bad_request"
    assert {r.get("rid") for r in replies} == {None, 51, 52}
    peer.close()
    assert shard.poll() is None and cluster.procs[0] is shard
