"""Synthetic child snapshots (DESIGN.md "Stats snapshot") and scrape helpers for tests."""
import os

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shard.histogram import DEFAULT_LATENCY_BOUNDS
from supervisor.metrics import MetricsState, make_registry

BOUNDS = list(DEFAULT_LATENCY_BOUNDS)     # what shards and the router really send


def shard_snapshot(shard, inc="inc-a", committed=10, counts=None, flushes=2, pid=None):
    counts = counts or [1] + [0] * (len(BOUNDS) - 1) + [0]
    return {
        "role": "shard", "shard": shard, "pid": pid or os.getpid(), "inc": inc, "ts": 1.0,
        "keys": 100, "versions": 250, "horizon": 7, "max_ts": 99, "block_height": 4, "prepared": 0,
        "txn": {"committed": committed, "conflict": 3, "error": 1},
        "twopc": {"prepared": 5, "committed": 4, "aborted": 1},
        "commit_latency": {"bounds": BOUNDS, "counts": counts, "sum": 0.01 * sum(counts),
                           "count": sum(counts)},
        "tps": 12.5, "latency_p50_ms": 0.2, "latency_p90_ms": 0.5, "latency_p99_ms": 2.0,
        "flush": {"flush_count": flushes, "keys_flushed": 40, "bytes_flushed": 4000,
                  "last_flush_ts": 90, "last_flush_at": 1700000000.0, "last_flush_block": 3,
                  "last_duration_secs": 0.02, "seconds_total": 0.05},
        "prune": {"prune_count": 1, "versions_removed": 17, "last_duration_secs": 0.01,
                  "seconds_total": 0.01},
        "batch_writer": {"chunk_size": 5000},
        "rocksdb": {"live_sst_bytes": 123456, "estimated_keys": 90,
                    "pending_compaction_bytes": 0, "memtable_bytes": 2048,
                    "block_cache_bytes": 4096},
    }


def router_snapshot(inc="r-1", gets=4):
    hist = {"bounds": BOUNDS, "counts": [gets] + [0] * len(BOUNDS), "sum": 0.001, "count": gets}
    return {
        "role": "router", "pid": os.getpid(), "inc": inc, "ts": 1.0, "commit_ts": 120,
        "block_height": 4,
        "requests": {"get": hist, "txn": dict(hist)},
        "results": [["get", "ok", gets], ["txn", "ok", 3], ["txn", "conflict", 1]],
        "twopc": {"committed": 4, "aborted": 1},
        "txn": {"committed": 7, "conflict": 2},
        "shards_up": {0: True, 1: True},
    }


def full_state(shards=2):
    state = MetricsState(shard_count=shards, memory_budget_versions=2_000_000)
    state.set_supervisor_pid(os.getpid())
    state.set_child("router", None, os.getpid(), True, 0)
    state.update("router", None, router_snapshot())
    for i in range(shards):
        state.set_child("shard", i, os.getpid(), True, 0)
        state.update("shard", i, shard_snapshot(i))
    return state


def scrape(state):
    text = generate_latest(make_registry(state)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families, name, sample_name=None, **labels):
    family = families[name]
    found = [s.value for s in family.samples
             if s.name == (sample_name or name) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, family.samples)
    return found[0]
