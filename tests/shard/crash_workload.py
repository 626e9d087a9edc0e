"""Crash-test child: runs a ShardEngine under a deterministic write workload.

    python crash_workload.py PATH DURABILITY FLUSH_EVERY PRUNE_EVERY

Txn t (commit ts t) is a pure function of t (`txn_writes`), so the parent can rebuild the
expected state from ts 1..max_ts. Prints, line-buffered:
  "ack T"   every txn with ts <= T is durable (printed after sync)
  "flush"   a flush step just ran;  "prune"  a prune step just ran
It continues from the database's max_ts, and runs until killed (or a bound of passes).
"""
import random
import sys

from shard.config import EngineConfig
from shard.engine import ShardEngine

KEYS = 150
GROUP = 16              # txns per sync (one group commit)
WRITES_PER_TXN = 3


def txn_writes(t: int) -> list:
    rng = random.Random(t)
    keys = rng.sample(range(KEYS), WRITES_PER_TXN)
    writes = []
    for i, k in enumerate(keys):
        value = None if rng.random() < 0.2 else b"t%d-%d" % (t, i)
        writes.append((b"key%03d" % k, value))
    return writes


def config(durability: str = "wal") -> EngineConfig:
    return EngineConfig(durability=durability, flush_on_start=False, prune_step_keys=10,
                        keep_versions=2, batch_writer={"min_chunk": 40, "max_chunk": 160},
                        rocksdb={"write_buffer_bytes": 1 << 20, "block_cache_bytes": 1 << 20})


def main() -> None:
    path, durability, flush_every, prune_every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    engine = ShardEngine.open(path, 0, 1, config(durability))
    t = engine.max_ts
    out = sys.stdout
    for passes in range(1, 200_000):
        for _ in range(GROUP):
            t += 1
            engine.commit(t, [], txn_writes(t))
        if passes % flush_every == 0 and engine.flush_job is None:
            engine.start_flush()
        if passes % prune_every == 0 and engine.prune_job is None:
            engine.start_prune(2)
        if engine.flush_job is not None:
            engine.flush_step()
            out.write("flush\n")
        if engine.prune_job is not None:
            engine.prune_step()
            out.write("prune\n")
        engine.sync()
        out.write(f"ack {t}\n")
        out.flush()


if __name__ == "__main__":
    main()
