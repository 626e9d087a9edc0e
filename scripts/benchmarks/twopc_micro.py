"""In-process micro-benchmark of one shard engine's side of cross-shard 2PC.

Models what a shard does for a 2-shard transfer under the worker's group commit: each
loop pass prepares a group of new txns (one read + one write each), commits the group
prepared in the previous pass, forgets the group committed in the pass before that, and
syncs once. Prints microseconds per txn (prepare + commit_prepared + forget + its share
of sync), split by step.

    .venv/bin/python scripts/benchmarks/twopc_micro.py [--src DIR] [--txns N] [--group G]

`--src DIR` imports `shard` from another checkout (e.g. /work/main) so before/after runs
can be interleaved on the same box.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time


def run(txns: int, group: int, accounts: int) -> dict:
    from shard.config import EngineConfig
    from shard.engine import ShardEngine

    with tempfile.TemporaryDirectory() as tmp:
        engine = ShardEngine.open(tmp, 0, 2, EngineConfig())
        value = b"v" * 100
        versions = [0] * accounts
        ts = 0
        spent = {"prepare": 0.0, "commit_prepared": 0.0, "forget": 0.0, "sync": 0.0}
        clock = time.perf_counter
        to_commit: list = []     # [(txn, ts, account)] prepared in the previous pass
        to_forget: list = []     # txn ids committed in the previous pass
        done = 0
        next_txn = 1
        while done < txns:
            t0 = clock()
            new = []
            for _ in range(group if next_txn <= txns else 0):
                ts += 1
                account = next_txn % accounts
                key = b"acct%012d" % account
                engine.prepare(next_txn, ts, [(key, versions[account])], [(key, value)], [0, 1])
                new.append((next_txn, ts, account))
                next_txn += 1
            t1 = clock()
            committed = []
            for txn, cts, account in to_commit:
                engine.commit_prepared(txn, cts)
                versions[account] = cts
                committed.append(txn)
            t2 = clock()
            engine.forget(to_forget)
            done += len(to_forget)
            t3 = clock()
            engine.sync()
            t4 = clock()
            spent["prepare"] += t1 - t0
            spent["commit_prepared"] += t2 - t1
            spent["forget"] += t3 - t2
            spent["sync"] += t4 - t3
            to_forget, to_commit = committed, new
        engine.close()
    us = {name: secs * 1e6 / txns for name, secs in spent.items()}
    us["total"] = sum(us.values())
    return us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="checkout to import `shard` from (default: this one)")
    parser.add_argument("--txns", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=20, help="txns per loop pass (one sync each)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    else:
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    runs = [run(args.txns, args.group, args.accounts) for _ in range(args.repeats)]
    best = {name: min(r[name] for r in runs) for name in runs[0]}
    import shard
    print(f"src={shard.__file__.rsplit('/', 2)[0]} txns={args.txns} group={args.group} "
          f"(best of {args.repeats}, us per txn)")
    print("  " + "  ".join(f"{name}={best[name]:.2f}" for name in best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
