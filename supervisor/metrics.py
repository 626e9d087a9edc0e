"""Aggregated Prometheus metrics for the whole node, served from cached snapshots.

Every child (router, shard workers) pushes a plain-dict status snapshot to the
supervisor (see DESIGN.md "Stats snapshot"). The supervisor loop thread hands each one
to `MetricsState.update`; the HTTP thread renders them with `ShardKVCollector`. A scrape
therefore never talks to a child: a dead or slow shard shows its last snapshot and
`shardkv_shard_up{shard} 0`.

Counters never go backwards at /metrics: a restarted child starts counting from zero,
so when a snapshot arrives from a new incarnation (`inc` differs) the totals of the
previous incarnation are carried over as a base (histogram buckets, sum and count too).
CPU seconds are carried over the same way when a component's pid changes.

Series are labelled by the stable shard id, never by pid, so a restart creates no new
series.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import psutil
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

INF = math.inf

# Flat counter keys: ("c", group, name) for plain counters and
# ("h", histogram, sub, "bucket", upper_bound) / ("h", histogram, sub, "sum"|"count").
# A shard's counters, by snapshot path.
_SHARD_COUNTER_GROUPS = ("txn", "twopc")
_SHARD_COUNTER_FIELDS = {
    "flush": ("flush_count", "keys_flushed", "bytes_flushed", "seconds_total"),
    "prune": ("prune_count", "versions_removed", "seconds_total"),
}


def _number(value) -> float | None:
    """A finite int/float (bools excluded), else None: bad fields are skipped."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _flatten_histogram(out: dict, name: str, sub: str, hist) -> None:
    """Per-bucket (non-cumulative) counts keyed by upper bound; the count past the
    last bound (if `counts` has one more entry than `bounds`) goes to +Inf."""
    if not isinstance(hist, dict):
        return
    bounds, counts = hist.get("bounds"), hist.get("counts")
    if isinstance(bounds, (list, tuple)) and isinstance(counts, (list, tuple)):
        for i, n in enumerate(counts):
            n = _number(n)
            if n is None:
                continue
            bound = _number(bounds[i]) if i < len(bounds) else INF
            if i < len(bounds) and bound is None:
                bound = INF if bounds[i] in (INF, "inf", "+Inf") else None
            if bound is None:
                continue
            key = ("h", name, sub, "bucket", bound)
            out[key] = out.get(key, 0.0) + n
    for part in ("sum", "count"):
        v = _number(hist.get(part))
        if v is not None:
            out[("h", name, sub, part)] = v


def counters_of(role: str, snapshot: dict) -> dict:
    """The monotonic counters of one snapshot as a flat {key: value} dict."""
    out: dict = {}

    def group(name: str, fields=None) -> None:
        g = snapshot.get(name)
        if not isinstance(g, dict):
            return
        for k, v in g.items():
            if fields is not None and k not in fields:
                continue
            v = _number(v)
            if v is not None:
                out[("c", name, str(k))] = v

    if role == "shard":
        for name in _SHARD_COUNTER_GROUPS:
            group(name)
        for name, fields in _SHARD_COUNTER_FIELDS.items():
            group(name, fields)
        _flatten_histogram(out, "commit_latency", "", snapshot.get("commit_latency"))
    elif role == "router":
        group("twopc")
        group("txn")       # per transaction, as clients see them (the shards count steps)
        requests = snapshot.get("requests")
        if isinstance(requests, dict):
            for op, hist in requests.items():
                _flatten_histogram(out, "requests", str(op), hist)
        # {op: {result: n}}, or the router's [[op, result, n], ...] form
        totals = snapshot.get("requests_total")
        rows = []
        if isinstance(totals, dict):
            rows = [(op, result, n) for op, by_result in totals.items() if isinstance(by_result, dict)
                    for result, n in by_result.items()]
        elif isinstance(snapshot.get("results"), list):
            rows = [tuple(row) for row in snapshot["results"] if isinstance(row, (list, tuple)) and len(row) == 3]
        for op, result, n in rows:
            n = _number(n)
            if n is not None:
                key = ("r", str(op), str(result))
                out[key] = out.get(key, 0.0) + n
    return out


@dataclass
class ChildEntry:
    """What the supervisor knows of one child (router or one shard)."""
    role: str
    shard: int | None
    pid: int | None = None
    up: bool = False
    restarts: int = 0
    snapshot: dict = field(default_factory=dict)
    received: float = 0.0          # time.time() of the last snapshot
    inc: object = None             # incarnation of the last snapshot
    base: dict = field(default_factory=dict)     # carried over from earlier incarnations
    retired: set = field(default_factory=set)    # incarnations already carried over
    current: dict = field(default_factory=dict)  # counters of the current incarnation

    def totals(self) -> dict:
        out = dict(self.base)
        for k, v in self.current.items():
            out[k] = out.get(k, 0.0) + v
        return out


@dataclass(frozen=True)
class ChildView:
    """An immutable copy of a ChildEntry, taken under the lock for one scrape."""
    role: str
    shard: int | None
    pid: int | None
    up: bool
    restarts: int
    snapshot: dict
    received: float
    totals: dict


class MetricsState:
    """Thread-safe cache of the children's snapshots.

    The supervisor loop thread writes (update, set_child, ...); the HTTP thread reads
    (view, healthy). Snapshots are replaced, never mutated, so readers can hold them.
    """

    def __init__(self, shard_count: int = 0, memory_budget_versions: int | None = None):
        self._lock = threading.Lock()
        self._router: ChildEntry | None = None
        self._shards: dict[int, ChildEntry] = {}
        self._supervisor_pid: int | None = None
        self._shard_count = 0
        self._budget_versions: int | None = None
        self.configure(shard_count=shard_count, memory_budget_versions=memory_budget_versions)

    # -- writers (supervisor loop thread) -------------------------------------------

    def configure(self, shard_count: int | None = None, memory_budget_versions: int | None = None) -> None:
        """Static facts from the config: shard count (for /healthz), memory budget."""
        with self._lock:
            if shard_count is not None:
                self._shard_count = int(shard_count)
            if memory_budget_versions is not None:
                self._budget_versions = int(memory_budget_versions)

    def set_supervisor_pid(self, pid: int | None) -> None:
        with self._lock:
            self._supervisor_pid = pid

    def set_child(self, role: str, shard: int | None, pid: int | None, up: bool,
                  restarts: int) -> None:
        with self._lock:
            entry = self._entry(role, shard)
            if entry is None:
                return
            entry.pid, entry.up, entry.restarts = pid, bool(up), int(restarts)

    def update(self, role: str, shard: int | None, snapshot: dict) -> None:
        """Cache a snapshot pushed by a child; carry counters over a new incarnation."""
        if not isinstance(snapshot, dict):
            return
        counters = counters_of(role, snapshot)
        with self._lock:
            entry = self._entry(role, shard)
            if entry is None:
                return
            inc = snapshot.get("inc")
            if inc is not None and inc in entry.retired:
                return      # a late message from a dead incarnation: already counted
            if entry.snapshot and self._is_new_incarnation(entry, inc, counters, snapshot.get("pid")):
                entry.base = entry.totals()
                if entry.inc is not None:
                    entry.retired.add(entry.inc)
            entry.current = counters
            entry.inc = inc
            entry.snapshot = snapshot
            entry.received = time.time()
            if entry.pid is None and isinstance(snapshot.get("pid"), int):
                entry.pid = snapshot["pid"]

    @staticmethod
    def _is_new_incarnation(entry: ChildEntry, inc, counters: dict, pid) -> bool:
        if inc is not None or entry.inc is not None:
            return inc != entry.inc
        # No incarnation id at all: another pid, a counter going down or one gone (a new
        # process's first snapshot may hold none yet) means the child restarted.
        old_pid = entry.snapshot.get("pid")
        if isinstance(pid, int) and isinstance(old_pid, int) and pid != old_pid:
            return True
        return any(counters.get(k, 0.0) < v for k, v in entry.current.items())

    def _entry(self, role: str, shard: int | None) -> ChildEntry | None:
        if role == "router":
            if self._router is None:
                self._router = ChildEntry("router", None)
            return self._router
        if role == "shard" and isinstance(shard, int) and not isinstance(shard, bool) and shard >= 0:
            if shard not in self._shards:
                self._shards[shard] = ChildEntry("shard", shard)
            return self._shards[shard]
        return None

    # -- readers (HTTP thread) ------------------------------------------------------

    def down_parts(self) -> list[str]:
        """Names of the parts that are not up ("router", "shard 1", ...)."""
        with self._lock:
            down = []
            if self._router is None or not self._router.up:
                down.append("router")
            ids = sorted(set(range(self._shard_count)) | set(self._shards))
            for i in ids:
                e = self._shards.get(i)
                if e is None or not e.up:
                    down.append(f"shard {i}")
            return down

    def healthy(self) -> bool:
        return not self.down_parts()

    def view(self) -> dict:
        """A consistent copy of everything a scrape needs."""
        def freeze(e: ChildEntry) -> ChildView:
            return ChildView(e.role, e.shard, e.pid, e.up, e.restarts, e.snapshot,
                             e.received, e.totals())
        with self._lock:
            shard_ids = sorted(set(range(self._shard_count)) | set(self._shards))
            return {
                "supervisor_pid": self._supervisor_pid,
                "router": freeze(self._router) if self._router else None,
                "shards": {i: freeze(self._shards[i]) if i in self._shards
                           else ChildView("shard", i, None, False, 0, {}, 0.0, {})
                           for i in shard_ids},
                "budget_versions": self._budget_versions,
            }


# Gauges taken straight from a shard snapshot: (metric, path, help).
_SHARD_GAUGES = (
    ("shardkv_keys", ("keys",), "Live keys in the shard."),
    ("shardkv_versions", ("versions",), "Versions resident in the shard's memory (not yet flushed)."),
    ("shardkv_read_horizon", ("horizon",), "Oldest commit_ts still readable (older `at` answers too_old)."),
    ("shardkv_shard_max_ts", ("max_ts",), "Highest commit_ts the shard has applied."),
    ("shardkv_shard_block_height", ("block_height",), "Block height durable in the shard."),
    ("shardkv_prepared_txns", ("prepared",), "2PC transactions prepared and not yet decided."),
    ("shardkv_outcome_records", ("outcomes",),
     "Outcome records of committed cross-shard txns not yet forgotten (kept until every participant applied the commit)."),
    ("shardkv_last_flush_timestamp_seconds", ("flush", "last_flush_at"),
     "Unix time of the shard's last completed flush (0 = never)."),
    ("shardkv_last_flush_commit_ts", ("flush", "last_flush_ts"), "commit_ts of the shard's last flush cut."),
    ("shardkv_last_flush_block", ("flush", "last_flush_block"), "Block height at the shard's last flush."),
    ("shardkv_last_flush_duration_seconds", ("flush", "last_duration_secs"), "Duration of the last flush."),
    ("shardkv_last_prune_duration_seconds", ("prune", "last_duration_secs"), "Duration of the last prune."),
    ("shardkv_batch_writer_chunk_size", ("batch_writer", "chunk_size"),
     "Current chunk size of the adaptive batch writer."),
    ("shardkv_rocksdb_live_sst_bytes", ("rocksdb", "live_sst_bytes"), "RocksDB rocksdb.live-sst-files-size."),
    ("shardkv_rocksdb_estimated_keys", ("rocksdb", "estimated_keys"), "RocksDB rocksdb.estimate-num-keys."),
    ("shardkv_rocksdb_pending_compaction_bytes", ("rocksdb", "pending_compaction_bytes"),
     "RocksDB rocksdb.estimate-pending-compaction-bytes."),
    ("shardkv_rocksdb_memtable_bytes", ("rocksdb", "memtable_bytes"), "RocksDB rocksdb.cur-size-all-mem-tables."),
    ("shardkv_rocksdb_block_cache_bytes", ("rocksdb", "block_cache_bytes"),
     "RocksDB rocksdb.block-cache-usage (one cache per shard, at most [rocksdb] block_cache_bytes)."),
    ("shardkv_disk_free_bytes", ("disk", "free_bytes"),
     "Bytes free on the file system of the shard's directory."),
    ("shardkv_shard_writes_refused", ("disk", "writes_refused"),
     "1 while the shard refuses writes for want of disk space ([durability] min_free_bytes, or read-only)."),
    ("shardkv_shard_read_only", ("disk", "read_only"),
     "1 while the shard's database is open read-only (the disk was too full to open it for writing)."),
)

# Counters from a shard's carried-over totals: (metric, key, help).
_SHARD_COUNTERS = (
    ("shardkv_flush_total", ("c", "flush", "flush_count"), "Flushes completed by the shard."),
    ("shardkv_flush_keys_total", ("c", "flush", "keys_flushed"), "Key versions written to RocksDB by flushes."),
    ("shardkv_flush_bytes_total", ("c", "flush", "bytes_flushed"), "Bytes written to RocksDB by flushes."),
    ("shardkv_flush_duration_seconds_total", ("c", "flush", "seconds_total"), "Time spent flushing."),
    ("shardkv_prune_total", ("c", "prune", "prune_count"), "Prune runs completed by the shard."),
    ("shardkv_pruned_versions_total", ("c", "prune", "versions_removed"), "Versions removed by pruning."),
    ("shardkv_prune_duration_seconds_total", ("c", "prune", "seconds_total"), "Time spent pruning."),
)

TXN_RESULTS = ("committed", "conflict", "error")
TWOPC_RESULTS = ("prepared", "committed", "aborted")


def _path(snapshot: dict, path: tuple):
    value = snapshot
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return _number(value)


def _histogram(totals: dict, name: str, sub: str):
    """(buckets, sum) in Prometheus form from carried totals, or None if absent."""
    per_bucket = {k[4]: v for k, v in totals.items()
                  if k[0] == "h" and k[1] == name and k[2] == sub and k[3] == "bucket"}
    count = totals.get(("h", name, sub, "count"))
    total = totals.get(("h", name, sub, "sum"), 0.0)
    if not per_bucket and count is None:
        return None
    buckets, running = [], 0.0
    for bound in sorted(b for b in per_bucket if b != INF):
        running += per_bucket[bound]
        buckets.append((floatToGoString(bound), running))
    # +Inf must equal the count; never below a finite bucket.
    inf = max(running + per_bucket.get(INF, 0.0), count or 0.0)
    buckets.append(("+Inf", inf))
    return buckets, total


class _ProcessSampler:
    """RSS and CPU seconds per component, by pid, with CPU carried over pid changes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[tuple, list] = {}   # (component, shard) -> [pid, last_cpu, base]

    def sample(self, key: tuple, pid: int | None) -> tuple[float | None, float | None]:
        """(rss_bytes, cpu_seconds_total); rss None when the process is gone."""
        rss = cpu = None
        if pid:
            try:
                proc = self._procs.get(pid)
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                with proc.oneshot():
                    rss = float(proc.memory_info().rss)
                    t = proc.cpu_times()
                    cpu = float(t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.pop(pid, None)
                rss = cpu = None
        with self._lock:
            state = self._cpu.setdefault(key, [pid, 0.0, 0.0])
            if pid and state[0] != pid:
                state[2] += state[1]          # the old process's CPU stays counted
                state[0], state[1] = pid, 0.0
            if cpu is not None and cpu >= state[1]:
                state[1] = cpu
            return rss, state[1] + state[2]

    def forget_dead(self, live_pids: set) -> None:
        for pid in list(self._procs):
            if pid not in live_pids:
                self._procs.pop(pid, None)


class ShardKVCollector(Collector):
    """Yields every shardkv metric family from a MetricsState (never blocks on a child)."""

    def __init__(self, state: MetricsState):
        self.state = state
        self._sampler = _ProcessSampler()

    def collect(self):
        v = self.state.view()
        shards: dict[int, ChildView] = v["shards"]
        router: ChildView | None = v["router"]
        sid = {i: str(i) for i in shards}
        yield from self._shard_families(shards, sid)
        yield from self._router_families(router, shards)
        yield from self._process_families(v, shards, router)

    def _shard_families(self, shards: dict, sid: dict):
        up = GaugeMetricFamily("shardkv_shard_up", "1 when the shard worker is up.", labels=["shard"])
        restarts = CounterMetricFamily("shardkv_shard_restarts",
                                       "Times the supervisor restarted the shard worker.", labels=["shard"])
        age = GaugeMetricFamily("shardkv_shard_snapshot_age_seconds",
                                "Seconds since the shard's last status snapshot.", labels=["shard"])
        now = time.time()
        for i, s in shards.items():
            up.add_metric([sid[i]], 1.0 if s.up else 0.0)
            restarts.add_metric([sid[i]], float(s.restarts))
            if s.received:
                age.add_metric([sid[i]], max(0.0, now - s.received))
        yield up
        yield restarts
        yield age

        for name, path, doc in _SHARD_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            for i, s in shards.items():
                value = _path(s.snapshot, path)
                if value is not None:
                    g.add_metric([sid[i]], value)
            yield g

        for name, key, doc in _SHARD_COUNTERS:
            c = CounterMetricFamily(name.removesuffix("_total"), doc, labels=["shard"])
            for i, s in shards.items():
                if key in s.totals:
                    c.add_metric([sid[i]], s.totals[key])
            yield c

        for group, known, name, doc in (
                ("txn", TXN_RESULTS, "shardkv_txn",
                 "Transaction steps in the shard, by result: a cross-shard txn counts in every participant, "
                 "a read-only validation only when it fails (as conflict). Transactions: shardkv_node_txn_total."),
                ("twopc", TWOPC_RESULTS, "shardkv_twopc", "2PC participant steps in the shard, by result.")):
            c = CounterMetricFamily(name, doc, labels=["shard", "result"])
            for i, s in shards.items():
                results = {k[2] for k in s.totals if k[0] == "c" and k[1] == group}
                if s.snapshot or s.totals:
                    results |= set(known)   # zeros keep rate() queries well defined
                for r in sorted(results):
                    c.add_metric([sid[i], r], s.totals.get(("c", group, r), 0.0))
            yield c

        h = HistogramMetricFamily("shardkv_txn_duration_seconds",
                                  "Commit latency in the shard (validate + apply + durable write).",
                                  labels=["shard"])
        for i, s in shards.items():
            hist = _histogram(s.totals, "commit_latency", "")
            if hist:
                h.add_metric([sid[i]], hist[0], hist[1])
        yield h

    def _router_families(self, router: ChildView | None, shards: dict):
        snap = router.snapshot if router else {}
        totals = router.totals if router else {}

        up = GaugeMetricFamily("shardkv_router_up", "1 when the router is up.")
        up.add_metric([], 1.0 if router and router.up else 0.0)
        yield up
        restarts = CounterMetricFamily("shardkv_router_restarts", "Times the supervisor restarted the router.")
        restarts.add_metric([], float(router.restarts if router else 0))
        yield restarts

        # Node-wide figures: the router's, else the best the shards know.
        def node_value(router_key: str, shard_key: str):
            value = _number(snap.get(router_key))
            if value is None:
                values = [_path(s.snapshot, (shard_key,)) for s in shards.values()]
                values = [x for x in values if x is not None]
                value = max(values) if values else None
            return value
        for name, rkey, skey, doc in (
                ("shardkv_block_height", "block_height", "block_height", "Latest block height of the node."),
                ("shardkv_commit_ts", "commit_ts", "max_ts", "Latest allocated commit_ts.")):
            g = GaugeMetricFamily(name, doc)
            value = node_value(rkey, skey)
            if value is not None:
                g.add_metric([], value)
            yield g

        h = HistogramMetricFamily("shardkv_request_duration_seconds",
                                  "Client request latency at the router, end to end, by op.", labels=["op"])
        ops = sorted({k[2] for k in totals if k[0] == "h" and k[1] == "requests"})
        for op in ops:
            hist = _histogram(totals, "requests", op)
            if hist:
                h.add_metric([op], hist[0], hist[1])
        yield h

        c = CounterMetricFamily("shardkv_requests", "Client requests answered by the router, by op and result.",
                                labels=["op", "result"])
        for key in sorted(k for k in totals if k[0] == "r"):
            c.add_metric([key[1], key[2]], totals[key])
        yield c

        c = CounterMetricFamily("shardkv_router_twopc", "Cross-shard transactions coordinated by the router.",
                                labels=["result"])
        for key in sorted(k for k in totals if k[0] == "c" and k[1] == "twopc"):
            c.add_metric([key[2]], totals[key])
        yield c

        c = CounterMetricFamily("shardkv_node_txn",
                                "Transactions of the node by result, each once as its client saw it "
                                "(txn requests and batch entries, read-only ones too).", labels=["result"])
        results = {k[2] for k in totals if k[0] == "c" and k[1] == "txn"}
        if snap:
            results |= set(TXN_RESULTS)   # zeros keep rate() queries well defined
        for r in sorted(results):
            c.add_metric([r], totals.get(("c", "txn", r), 0.0))
        yield c

        g = GaugeMetricFamily("shardkv_router_shard_reachable",
                              "1 when the router gets ping answers from the shard.", labels=["shard"])
        reachable = snap.get("shards_up")
        if isinstance(reachable, dict):
            for i, ok in sorted(reachable.items(), key=lambda kv: str(kv[0])):
                g.add_metric([str(i)], 1.0 if ok else 0.0)
        yield g

    def _process_families(self, v: dict, shards: dict, router: ChildView | None):
        rss = GaugeMetricFamily("shardkv_process_resident_memory_bytes",
                                "Resident memory of each node process.", labels=["component", "shard"])
        cpu = CounterMetricFamily("shardkv_process_cpu_seconds",
                                  "User + system CPU seconds of each node process (carried over restarts).",
                                  labels=["component", "shard"])
        parts = [("supervisor", "", v["supervisor_pid"])]
        if router is not None:
            parts.append(("router", "", router.pid if router.up else None))
        parts += [("shard", str(i), s.pid if s.up else None) for i, s in shards.items()]
        for component, shard, pid in parts:
            r, c = self._sampler.sample((component, shard), pid)
            if r is not None:
                rss.add_metric([component, shard], r)
            if c is not None and (pid or c > 0):
                cpu.add_metric([component, shard], c)
        self._sampler.forget_dead({pid for _, _, pid in parts if pid})
        yield rss
        yield cpu

        budget = GaugeMetricFamily("shardkv_memory_budget_versions",
                                   "Configured memory.max_resident_versions per shard.")
        if v["budget_versions"] is not None:
            budget.add_metric([], float(v["budget_versions"]))
        yield budget
        budget_bytes = GaugeMetricFamily(
            "shardkv_memory_budget_bytes",
            "The machine's total RAM (not a cgroup or container limit): the budget RssNearBudget "
            "compares the node's RSS with.")
        budget_bytes.add_metric([], float(psutil.virtual_memory().total))
        yield budget_bytes
        shards_g = GaugeMetricFamily("shardkv_shards", "Configured number of shards.")
        shards_g.add_metric([], float(len(shards)))
        yield shards_g


def make_registry(state: MetricsState) -> CollectorRegistry:
    """A private registry holding only the shardkv collector (not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShardKVCollector(state))
    return registry
