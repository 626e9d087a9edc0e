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


def key_on(shard: int, shards: int, tag: bytes) -> bytes:
    return next(k for k in (tag + b"-%d" % i for i in range(1000)) if zlib.crc32(k) % shards == shard)


def prepare_by_hand(cluster, shard: int, txn: int, key: bytes) -> None:
    """Leave txn prepared (participants 0 and 1) on one shard, as a router that died
    between the prepares and the commit_prepared messages would."""
    engine = ShardEngine.open(os.path.join(cluster.data_dir, f"shard-{shard}"), shard, 2, EngineConfig())
    try:
        engine.prepare(txn, txn, [], [(key, b"v")], [0, 1])
        engine.sync()
    finally:
        engine.close()


def restart(cluster):
    for i in range(2):
        cluster.start_shard(i, wait=False)
    cluster.start_router()
    return cluster.client()


def test_a_txn_prepared_on_every_participant_is_committed_by_the_next_router(make_cluster):
    """The router answers a cross-shard commit at its decision, before any participant
    has an outcome record: all it knows then is that every participant holds the txn
    prepared, so recovery must commit such a txn."""
    cluster = make_cluster(2)
    ts = cluster.client().ok("txn", writes=[[b"before", b"1"]])["commit_ts"]
    stop_processes(cluster)
    keys = [key_on(0, 2, b"all"), key_on(1, 2, b"all")]
    for shard in (0, 1):
        prepare_by_hand(cluster, shard, ts + 1, keys[shard])
    client = restart(cluster)
    assert client.ok("get", keys=keys)["values"] == [b"v", b"v"]
    stop_processes(cluster)


def test_a_txn_prepared_on_some_participants_only_is_aborted(make_cluster):
    """A participant without the txn (its prepare never ran, or it aborted it) means no
    client was told it committed: recovery aborts it everywhere."""
    cluster = make_cluster(2)
    ts = cluster.client().ok("txn", writes=[[b"before", b"1"]])["commit_ts"]
    stop_processes(cluster)
    keys = [key_on(0, 2, b"some"), key_on(1, 2, b"some")]
    prepare_by_hand(cluster, 0, ts + 1, keys[0])
    client = restart(cluster)
    assert client.ok("get", keys=keys)["values"] == [None, None]
    # and the aborted txn holds no lock: its key takes a new write
    client.ok("txn", writes=[[keys[0], b"w"]])
    assert client.ok("get", keys=keys)["values"] == [b"w", None]
    stop_processes(cluster)
