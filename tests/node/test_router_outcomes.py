"""Outcome records left behind by a router that died are forgotten by the next router."""
import os
import signal
import zlib

from shard.config import EngineConfig
from shard.engine import ShardEngine


def stop_processes(cluster):
    for proc in cluster.procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in cluster.procs.values():
        assert proc.wait(15) == 0


def test_router_start_forgets_outcome_records_no_prepared_txn_needs(make_cluster):
    cluster = make_cluster(2)
    client = cluster.client()
    ts = client.ok("txn", writes=[[b"before", b"1"]])["commit_ts"]
    stop_processes(cluster)

    # A router that died after every participant acked a 2PC commit, but before its
    # `forget`, leaves an outcome record on each participant: make one by hand.
    shard_dir = os.path.join(cluster.data_dir, "shard-0")
    engine = ShardEngine.open(shard_dir, 0, 2, EngineConfig())
    orphan = ts + 1
    key = next(k for k in (b"orphan-%d" % i for i in range(100)) if zlib.crc32(k) % 2 == 0)
    engine.prepare(orphan, orphan, [], [(key, b"x")], [0, 1])
    engine.commit_prepared(orphan, orphan)
    engine.sync()
    assert engine.outcome_txns() == [orphan]
    engine.close()

    for i in range(2):
        cluster.start_shard(i, wait=False)
    cluster.start_router()
    client = cluster.client()
    assert client.ok("get", keys=[key])["values"] == [b"x"], "the commit stays"
    stop_processes(cluster)

    engine = ShardEngine.open(shard_dir, 0, 2, EngineConfig())
    try:
        assert engine.outcome_txns() == [], "the record was forgotten durably"
    finally:
        engine.close()
