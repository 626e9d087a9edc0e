"""Strict serializability end to end: the list-append workload (tests/e2e/
listappend_workload.py) from concurrent clients against real router and shard
processes, with SIGKILLs of shards and the router (and a SIGSTOP) in the second test,
and the whole history judged by the checker (tests/e2e/listappend.py) after recovery.

Longer runs (skipped unless SHARDKV_LISTAPPEND_SECS is set):

    SHARDKV_LISTAPPEND_SECS=300 .venv/bin/python -m pytest tests/node/test_listappend.py -k long -s

with optionally SHARDKV_LISTAPPEND_SEED, _KILL_EVERY (ops between kills, 600), _SHARDS (3),
_KEYS (12), _CLIENTS (4), _FLUSH_SECS (auto-flush interval, 0.5), _ADMIN (the share
of ops that are flushes and checkpoint creates, 0.002), _PRUNE=1 (prunes among them) and
_PAUSES=N (SIGSTOP/SIGCONT of a shard among the faults, N times as likely as others).
The run also ends after _MAX_OPS ops (default 1,000 per key): memory grows with the square
of the appends per key, so a long run needs more _KEYS, not only more _SECS.
"""
import os
import random
import signal
import time

import pytest

from node.router import shard_of
from tests.e2e.listappend import OK, check
from tests.e2e.listappend_workload import Workload, summary


def env(name: str, default, kind=int):
    value = os.environ.get("SHARDKV_LISTAPPEND_" + name)
    return kind(value) if value else default


def seed_of() -> int:
    return env("SEED", random.randrange(1 << 30))


def cross_shard_commits(history, shards: int) -> int:
    return sum(1 for t in history.txns if t.outcome == OK and t.writes
               and len({shard_of(k, shards) for k in t.reads}) > 1)


def assert_2pc_settles(cluster, within_secs: float = 15.0) -> None:
    """With the load stopped, no shard keeps a prepared txn or an outcome record: every
    2PC txn was decided and applied everywhere (forgets ride with pings at the latest).
    One left behind is a leak that grows with every fault."""
    client = cluster.client()
    deadline = time.monotonic() + within_secs
    held = None
    while time.monotonic() < deadline:
        stats = client.call("stats")
        if stats["ok"]:
            held = {s["shard"]: (s.get("prepared", 0), s.get("outcomes", 0)) for s in stats["shards"]}
            if not any(p or o for p, o in held.values()):
                return
        time.sleep(0.05)      # polls the condition: forgets go out with the next ping
    raise AssertionError(f"(prepared, outcome records) per shard {within_secs} s after the load: {held}")


def verdict(workload: Workload, cluster, seed: int):
    """Read the final state once every shard is back, check the whole history, and
    that no 2PC state is left behind."""
    cluster.wait_all_shards_up()
    history = workload.read_final()
    anomalies = check(history)
    counts = summary(history)
    shown = "\n".join(map(str, anomalies[:20]))
    assert not anomalies, f"seed {seed}: {len(anomalies)} anomalies, {counts}\n{shown}"
    assert not workload.recorder.unexpected, workload.recorder.unexpected[:5]
    assert_2pc_settles(cluster)
    return history, counts


@pytest.mark.parametrize("shards", [2, 3])
def test_list_append_history_is_strictly_serializable(make_cluster, shards):
    seed = seed_of()
    cluster = make_cluster(shards)
    workload = Workload(cluster.endpoint, shards, keys=12, clients=4, seed=seed).start()
    try:
        workload.wait_ops(4000, timeout=90)
    finally:
        workload.stop()
    history, counts = verdict(workload, cluster, seed)
    # the run exercised what it is for: conflicts, write skew shapes, cross-shard commits,
    # batches, read-only txns, reads at an older ts
    assert counts["committed_writes"] > 500 and counts["refused"] > 100, counts
    assert counts["write_skew_shapes"] > 100 and cross_shard_commits(history, shards) > 100, counts
    assert counts["batch_entries_ok"] > 100 and counts["committed_read_only"] > 50, counts
    assert counts["reads_at"] > 200, counts


def kill_and_restart(cluster, workload, which, ops_between=150):
    """SIGKILL `which` (a shard index or "router") while a burst of 2PC txns is in
    flight, let the clients run against the gap, restart it, wait until it is ready."""
    def kill():
        cluster.kill(which)
        if which == "router":
            workload.faults.router_killed()   # replies to requests sent before are lost
    workload.burst_during(kill)
    if which == "router":
        cluster.start_router()
    else:
        workload.wait_ops(ops_between // 3)   # ops on the other shards go on meanwhile
        cluster.start_shard(which)
    workload.wait_ops(ops_between)


def kill_router_while_shard_down(cluster, workload, shard, ops_between=150):
    """SIGKILL a shard, then the router (a burst in flight on the other shards), then
    restart both: the new router resolves every shard's in-doubt txns before it is ready."""
    cluster.kill(shard)
    workload.wait_ops(ops_between // 5)

    def kill():
        cluster.kill("router")
        workload.faults.router_killed()
    workload.burst_during(kill)
    cluster.start_shard(shard)
    cluster.start_router()
    workload.wait_ops(ops_between)


def pause_and_resume(cluster, workload, shard, ops_between=150):
    """SIGSTOP a shard while a burst of 2PC txns is in flight, until the router has
    given up on it (the burst's replies from it come back failed after
    shard_timeout_secs), then SIGCONT: the shard then runs the messages the router
    already failed as lost, and is resolved before it serves again."""
    proc = cluster.procs[shard]
    workload.burst_during(lambda: proc.send_signal(signal.SIGSTOP))
    try:
        workload.wait_ops(ops_between)
    finally:
        proc.send_signal(signal.SIGCONT)
    workload.wait_ops(ops_between)


def fault(cluster, workload, which) -> None:
    """One fault: a shard index or "router" (SIGKILL and restart), ("router", i) (the
    router while shard i is down), ("pause", i) (SIGSTOP, then SIGCONT shard i)."""
    if which == "router" or isinstance(which, int):
        kill_and_restart(cluster, workload, which)
    elif which[0] == "router":
        kill_router_while_shard_down(cluster, workload, which[1])
    else:
        pause_and_resume(cluster, workload, which[1])


def test_list_append_stays_strictly_serializable_across_sigkills(make_cluster):
    """Fifteen faults (SIGKILLs of shards, of the router, of the router while a shard
    is down, a shard paused past the router's timeout; each while 2PC txns are in
    flight), with auto-flushes and a few flush and checkpoint barriers, so recovery
    replays logs on top of flushed state."""
    seed = seed_of()
    cluster = make_cluster(3, flush={"interval_secs": 0.5})
    workload = Workload(cluster.endpoint, 3, keys=12, clients=4, seed=seed, admin=0.003).start()
    try:
        workload.wait_ops(300)
        for which in (1, "router", 0, 2, ("router", 1), 1, ("pause", 0), 0, "router", 2,
                      "router", 0, ("router", 2), "router", 2):
            fault(cluster, workload, which)
    finally:
        workload.stop()
    history, counts = verdict(workload, cluster, seed)
    assert counts["committed_writes"] > 500 and counts["unknown"] > 0, counts
    assert cross_shard_commits(history, 3) > 100, counts


@pytest.mark.skipif(not os.environ.get("SHARDKV_LISTAPPEND_SECS"),
                    reason="long run: set SHARDKV_LISTAPPEND_SECS")
@pytest.mark.timeout(env("SECS", 0, float) * 2 + 300)
def test_long_list_append_with_kills(make_cluster):
    seed = seed_of()
    rng = random.Random(seed)
    shards = env("SHARDS", 3)
    cluster = make_cluster(shards, flush={"interval_secs": env("FLUSH_SECS", 0.5, float)})
    workload = Workload(cluster.endpoint, shards, keys=env("KEYS", 12), clients=env("CLIENTS", 4),
                        seed=seed, admin=env("ADMIN", 0.002, float), prune=bool(env("PRUNE", 0))).start()
    end = time.monotonic() + env("SECS", 0, float)
    # Bounded in ops too: every value is its key's whole list, and the history keeps each
    # read's list and the final walk each version's, so memory grows with the square of
    # the appends per key (12 keys and ~60,000 ops took 24 GB and the OOM killer). For
    # longer runs raise _KEYS with _SECS; _MAX_OPS overrides the cap.
    max_ops = env("MAX_OPS", 1000 * env("KEYS", 12))
    faults = 0
    try:
        while time.monotonic() < end and workload.recorder.ops < max_ops:
            workload.wait_ops(env("KILL_EVERY", 600), timeout=120)
            fault(cluster, workload, rng.choice(
                [*range(shards), "router", "router", ("router", rng.randrange(shards))]
                + [("pause", rng.randrange(shards))] * env("PAUSES", 0)))
            faults += 1
    finally:
        workload.stop()
    history, counts = verdict(workload, cluster, seed)
    cross = cross_shard_commits(history, shards)
    print(f"seed {seed}: {faults} faults, {counts}, cross-shard commits {cross}")
    assert shards == 1 or cross > 0, counts
