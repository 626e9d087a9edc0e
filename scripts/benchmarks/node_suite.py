"""`scripts/bench node`: end to end over ZeroMQ against Redis 7 + AOF (issue 6).

Same client process, same run: bank transfers between 10,000 accounts.
Throughput is measured in interleaved pairs (a Redis run, then a shardkv run, `pairs`
times for each shard count, both servers up all along): this VM's speed drifts by tens of
percent within minutes, so each ratio compares runs seconds apart, and the figure reported
is the pair with the median ratio.
- shardkv: `get` the 200 balances of 100 disjoint transfers, then one `batch` of the 100
  transfers with their read versions; `rounds_in_flight` rounds pipelined on one DEALER.
- Redis: a Lua transfer script, EVALSHA pipelined 100 per round trip (redis-py).
Then single-request latency (one txn / one EVALSHA per round trip) and shardkv
throughput for 1, 2 and 4 shards. The latency floor of the transport is measured in the
same run too: a ZeroMQ echo through a process that does nothing else (EchoProcess), from
the same client code, so the report shows how much of a node round trip is ZeroMQ alone.

shardkv's latency is measured twice: right after the throughput run, while the shards
flush the versions it wrote (a flush runs in slices between requests, and a request that
arrives during a slice waits for it), and then after an explicit `flush`, with nothing
running in the background. The target figure is the second; both are reported.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from benchlib import Figure, Report, log, plot_bars, plot_lines, profiled
from procs import Conn, CpuMeter, EchoProcess, NodeProcess, RedisProcess, node_roles

from node.router import shard_of  # the same key placement as the node

SUITE = "node"
ACCOUNTS = 10_000
INITIAL = 1_000_000
PER_ROUND = 100

TRANSFER_LUA = """
local amount = tonumber(ARGV[1])
local from = tonumber(redis.call('GET', KEYS[1]) or '0')
if from < amount then return 0 end
redis.call('DECRBY', KEYS[1], amount)
redis.call('INCRBY', KEYS[2], amount)
return 1
"""


def account(i: int) -> bytes:
    return b"acct%05d" % i


class Settings:
    def __init__(self, quick: bool):
        self.seconds = 3.0 if quick else 6.0       # one run of a pair (each side)
        self.pairs = 1 if quick else 4              # interleaved Redis/shardkv pairs per shard count
        self.profile_seconds = 2.0 if quick else 4.0
        self.latency_txns = 300 if quick else 5_000
        self.latency_blocks = 3 if quick else 10     # alternating Redis/shardkv blocks of latency_txns
        self.rounds_in_flight = 4
        self.paced_rate = 1000                      # txns/s, one at a time: busy polling's CPU price
        self.paced_seconds = 1.5 if quick else 4.0


# -- shardkv ------------------------------------------------------------------------------------

def load_accounts(conn: Conn) -> None:
    for start in range(0, ACCOUNTS, 1000):
        reply = conn.call("txn", writes=[[account(i), b"%d" % INITIAL] for i in range(start, min(ACCOUNTS, start + 1000))])
        if not reply.get("ok"):
            raise RuntimeError(f"loading accounts failed: {reply}")


def total_balance(conn: Conn) -> int:
    total = 0
    for start in range(0, ACCOUNTS, 5000):
        reply = conn.call("get", keys=[account(i) for i in range(start, min(ACCOUNTS, start + 5000))])
        total += sum(int(v) for v in reply["values"])
    return total


def shardkv_transfers(conn: Conn, seconds: float, in_flight: int, rng: random.Random) -> dict:
    """Pipelined rounds: get(200 keys) -> batch(100 transfers with read versions)."""
    pending: dict[int, tuple] = {}      # rid -> ("get", pairs) | ("batch", None)
    committed = conflicts = errors = rounds = 0

    def start_round() -> None:
        picks = rng.sample(range(ACCOUNTS), 2 * PER_ROUND)        # disjoint within a round
        pairs = [(account(picks[2 * i]), account(picks[2 * i + 1])) for i in range(PER_ROUND)]
        keys = [k for pair in pairs for k in pair]
        pending[conn.send("get", keys=keys)] = ("get", pairs)

    started = time.perf_counter()
    deadline = started + seconds
    for _ in range(in_flight):
        start_round()
    while pending:
        reply = conn.recv()
        kind, pairs = pending.pop(reply["id"])
        if kind == "get":
            values, versions = reply["values"], reply["versions"]
            txns = []
            for i, (a, b) in enumerate(pairs):
                va, vb = int(values[2 * i]), int(values[2 * i + 1])
                txns.append({"reads": [[a, versions[2 * i]], [b, versions[2 * i + 1]]],
                             "writes": [[a, b"%d" % (va - 1)], [b, b"%d" % (vb + 1)]]})
            pending[conn.send("batch", txns=txns)] = ("batch", None)
            continue
        rounds += 1
        if not reply.get("ok"):
            errors += PER_ROUND
        else:
            for r in reply["results"]:
                if r.get("ok"):
                    committed += 1
                elif r["error"]["code"] == "conflict":
                    conflicts += 1
                else:
                    errors += 1
        if time.perf_counter() < deadline:
            start_round()
    elapsed = time.perf_counter() - started
    return {"tps": committed / elapsed, "committed": committed, "conflicts": conflicts,
            "errors": errors, "rounds": rounds, "seconds": elapsed}


def metered(roles: dict, run) -> dict:
    """run() -> result dict with `committed` and `seconds`; adds `cpu_us` (CPU microseconds
    per committed transfer, by process) and `cores_busy` (CPU seconds per second)."""
    with CpuMeter(roles) as meter:
        result = run()
    done = max(1, result["committed"])
    result["cpu_us"] = {name: secs / done * 1e6 for name, secs in meter.used.items()}
    result["cores_busy"] = sum(meter.used.values()) / result["seconds"]
    return result


def echo_latency(n: int) -> dict:
    """Round trips of a ~100-byte frame to EchoProcess with the benchmark's own Conn."""
    echo = EchoProcess()
    conn = Conn(echo.endpoint)
    try:
        frame = b"x" * 100
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.sock.send(frame)
            conn.recv_raw()
            samples.append(time.perf_counter() - t0)
        return {"echo": samples}
    finally:
        conn.close()
        echo.stop()


def paced_txns(conn: Conn, roles: dict, rate: float, seconds: float, rng: random.Random) -> dict:
    """Single blind-write txns, one per round trip, started `rate` times a second for
    `seconds`: a trickle whose gaps are longer than the busy-poll window. Returns the txns
    done and the node's CPU as cores busy (the client excluded: it mostly sleeps here)."""
    node_roles_only = {k: v for k, v in roles.items() if k != "client"}
    done = 0
    with CpuMeter(node_roles_only) as meter:
        started = time.perf_counter()
        deadline = started + seconds
        next_at = started
        while (now := time.perf_counter()) < deadline:
            if now < next_at:
                time.sleep(next_at - now)
            next_at += 1 / rate
            # keys of their own: the accounts' total balance stays checkable
            a, b = (b"paced%05d" % i for i in rng.sample(range(ACCOUNTS), 2))
            if conn.call("txn", reads=[], writes=[[a, b"0"], [b, b"0"]]).get("ok"):
                done += 1
        elapsed = time.perf_counter() - started
    return {"txns_per_sec": done / elapsed, "node_cores_busy": sum(meter.used.values()) / elapsed}


def percentile(samples: list[float], q: float) -> float:
    """Exact nearest-rank percentile of raw samples. A benchmark keeps every sample: the
    node's fixed-bucket histograms would interpolate inside buckets as wide as 1.5 ms and
    report a P99 near a bucket bound rather than the measured one."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def shardkv_latency(conn: Conn, n: int, rng: random.Random, shards: int) -> dict:
    """One request per round trip: the commit (`txn` with read versions) alone, and the
    whole transfer (get + txn). Seconds, every sample; the commits are also kept apart by
    kind: both accounts on one shard (one shard round trip) or on two (two-phase commit)."""
    txn_samples, transfer_samples = [], []
    by_kind = {"single-shard": [], "cross-shard": []}
    for _ in range(n):
        a, b = (account(i) for i in rng.sample(range(ACCOUNTS), 2))
        t0 = time.perf_counter()
        got = conn.call("get", keys=[a, b])
        t1 = time.perf_counter()
        va, vb = (int(v) for v in got["values"])
        reply = conn.call("txn", reads=[[a, got["versions"][0]], [b, got["versions"][1]]],
                          writes=[[a, b"%d" % (va - 1)], [b, b"%d" % (vb + 1)]])
        t2 = time.perf_counter()
        if not reply.get("ok"):
            raise RuntimeError(f"latency txn failed: {reply}")
        txn_samples.append(t2 - t1)
        transfer_samples.append(t2 - t0)
        by_kind["single-shard" if shard_of(a, shards) == shard_of(b, shards) else "cross-shard"].append(t2 - t1)
    return {"txn": txn_samples, "transfer": transfer_samples, **by_kind}


# -- Redis --------------------------------------------------------------------------------------

def redis_setup(r) -> str:
    r.flushall()
    pipe = r.pipeline(transaction=False)
    for i in range(ACCOUNTS):
        pipe.set(account(i), INITIAL)
    pipe.execute()
    return r.script_load(TRANSFER_LUA)


def redis_transfers(r, sha: str, seconds: float, rng: random.Random) -> dict:
    committed = refused = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        pipe = r.pipeline(transaction=False)
        for _ in range(PER_ROUND):
            a, b = rng.sample(range(ACCOUNTS), 2)
            pipe.evalsha(sha, 2, account(a), account(b), 1)
        for ok in pipe.execute():
            committed += ok == 1
            refused += ok != 1
    elapsed = time.perf_counter() - started
    return {"tps": committed / elapsed, "committed": committed, "refused": refused, "seconds": elapsed}


def redis_latency(r, sha: str, n: int, rng: random.Random) -> dict:
    samples = []
    for _ in range(n):
        a, b = rng.sample(range(ACCOUNTS), 2)
        t0 = time.perf_counter()
        r.evalsha(sha, 2, account(a), account(b), 1)
        samples.append(time.perf_counter() - t0)
    return {"txn": samples}


def interleaved_latency(conn: Conn, s: Settings, rng: random.Random, shards: int,
                        redis_block) -> tuple[dict, dict]:
    """shardkv_latency and redis_block(n) in alternating blocks, the samples of each pooled:
    a drift of the host's speed during the run moves both sides alike (measured apart, the
    Redis P50 alone moved between 0.12 and 0.18 ms from one run to the next)."""
    node: dict = {}
    redis: dict = {"txn": []}
    n = max(1, s.latency_txns // s.latency_blocks)
    for _ in range(s.latency_blocks):
        redis["txn"] += redis_block(n)["txn"]
        for kind, samples in shardkv_latency(conn, n, rng, shards).items():
            node.setdefault(kind, []).extend(samples)
    return node, redis


def redis_total(r) -> int:
    return sum(int(v) for v in r.mget([account(i) for i in range(ACCOUNTS)]))


# -- the run ------------------------------------------------------------------------------------

def run(report: Report, quick: bool, shard_counts: list[int] | None = None) -> None:
    s = Settings(quick)
    shard_counts = shard_counts or [1, 2, 4]
    main_shards = 2 if 2 in shard_counts else shard_counts[0]
    tmp = Path(tempfile.mkdtemp(prefix="shardkv-bench-node-"))
    rng = random.Random(7)
    try:
        if not node_available():
            report.note("node: the router/worker/supervisor are not all on main yet; node figures skipped")
            return
        log("starting redis-server (AOF appendfsync everysec)")
        redis_proc = RedisProcess(tmp / "redis")
        try:
            sha = redis_setup(redis_proc.client)
            redis_roles = {"client": psutil.Process(), "redis-server": psutil.Process(redis_proc.proc.pid)}
            echo_lat = echo_latency(s.latency_txns)

            def redis_run() -> dict:
                return metered(redis_roles, lambda: redis_transfers(redis_proc.client, sha, s.seconds, rng))

            def redis_block(n: int) -> dict:
                return redis_latency(redis_proc.client, sha, n, rng)
            scaling, pairs, lat = {}, {}, {}
            for shards in shard_counts:
                pairs[shards], found = shard_count_runs(report, s, shards, shards == main_shards, tmp, rng,
                                                        redis_run, redis_block)
                scaling[shards] = median_pair(pairs[shards])
                lat.update(found)
            main_lat, flushing_lat, redis_lat = lat["after_flush"], lat["flushing"], lat["redis"]
            no_busy_poll = busy_poll_off_runs(report, s, main_shards, tmp, rng, redis_block)
            assert redis_total(redis_proc.client) == ACCOUNTS * INITIAL, "redis lost money"
        finally:
            redis_proc.stop()

        main_result, redis_best = scaling[main_shards]
        rtps = redis_best["tps"]
        for shards, (r, r_redis) in scaling.items():
            report.add(Figure(SUITE, f"CPU per transfer, all processes, {shards} shard(s)", sum(r["cpu_us"].values()),
                              "us", peer="Redis + the same client", peer_value=sum(r_redis["cpu_us"].values()),
                              higher_is_better=False,
                              note="; ".join(f"{k} {v:.1f}" for k, v in r["cpu_us"].items())
                                   + f" (cores busy {r['cores_busy']:.2f}; Redis run {r_redis['cores_busy']:.2f})"))
        report.series["node_cpu_us_per_transfer"] = {"redis": redis_best["cpu_us"],
                                                     **{str(k): v[0]["cpu_us"] for k, v in scaling.items()}}
        _plot_cpu(report, redis_best["cpu_us"], {k: v[0]["cpu_us"] for k, v in scaling.items()})

        def pair_note(shards: int) -> str:
            ratios = ", ".join(f"{n['tps'] / r['tps']:.2f}" for n, r in pairs[shards])
            return (f"the pair with the median ratio of {len(pairs[shards])} interleaved Redis/shardkv pairs "
                    f"(ratios {ratios}); {scaling[shards][0]['conflicts']} conflicts")
        report.add(Figure(SUITE, f"transfers/s, {main_shards} shards, get+batch(100), "
                                 f"{s.rounds_in_flight} rounds in flight", main_result["tps"], "transfers/s",
                          peer=f"Redis {redis_proc.version} AOF everysec, Lua EVALSHA x100", peer_value=rtps,
                          target=1.0, note=pair_note(main_shards)))
        for shards, (r, r_redis) in scaling.items():
            if shards != main_shards:
                report.add(Figure(SUITE, f"transfers/s, {shards} shard(s)", r["tps"], "transfers/s",
                                  peer="Redis", peer_value=r_redis["tps"], note=pair_note(shards)))
        def vs_redis(name: str, samples: list, note: str = "", p99_target: float | None = None,
                     redis_samples: list | None = None) -> None:
            """P50 and P99 of samples (seconds) against Redis's single EVALSHA latency (the
            blocks measured between the main node's, unless redis_samples are given)."""
            redis_samples = redis_samples or redis_lat["txn"]
            for q in (0.5, 0.99):
                pct = int(q * 100)
                report.add(Figure(SUITE, name.format(pct=pct), percentile(samples, q) * 1000, "ms",
                                  peer="Redis EVALSHA", peer_value=percentile(redis_samples, q) * 1000,
                                  higher_is_better=False, note=note,
                                  target=p99_target if pct == 99 else None))
        vs_redis(f"single txn latency P{{pct}} ({main_shards} shards)", main_lat["txn"], p99_target=2.0,
                 note=f"{s.latency_blocks} blocks alternating with Redis's, pooled")
        vs_redis(f"single txn latency P{{pct}} right after the load run, background flush running "
                 f"({main_shards} shards)", flushing_lat["txn"],
                 note="the figure above is measured after an explicit flush")
        for kind in ("single-shard", "cross-shard"):
            if len(main_lat[kind]) >= 20:
                vs_redis(f"single txn latency P{{pct}}, {kind} txns only ({main_shards} shards)", main_lat[kind],
                         note=f"{len(main_lat[kind])} of {len(main_lat['txn'])} samples")
        vs_redis("ZeroMQ echo round trip P{pct} (transport floor: no work)", echo_lat["echo"],
                 note="what one client round trip over ZeroMQ costs before any work")
        vs_redis(f"transfer latency get+txn P{{pct}} ({main_shards} shards)", main_lat["transfer"])
        vs_redis(f"single txn latency P{{pct}}, busy polling off ({main_shards} shards)",
                 no_busy_poll["latency"]["txn"], redis_samples=no_busy_poll["redis"]["txn"],
                 note="[node] busy_poll_us = 0 on a fresh node, in blocks alternating with Redis's; "
                      "the figures above use the default")
        on, off = lat["paced"], no_busy_poll["paced"]
        report.add(Figure(SUITE, f"node CPU at {s.paced_rate:,} single txns/s, one at a time ({main_shards} shards)",
                          on["node_cores_busy"], "cores", peer="busy polling off", peer_value=off["node_cores_busy"],
                          higher_is_better=False,
                          note=f"busy polling's price while requests trickle in; done "
                               f"{on['txns_per_sec']:,.0f}/s with it, {off['txns_per_sec']:,.0f}/s without"))
        report.series["node_throughput"] = {
            "redis": redis_best, "shardkv": {str(k): v[0] for k, v in scaling.items()},
            "pairs": {str(k): [{"shardkv_tps": n["tps"], "redis_tps": r["tps"], "ratio": n["tps"] / r["tps"]}
                               for n, r in runs] for k, runs in pairs.items()}}
        report.series["node_latency"] = {"shardkv": main_lat, "shardkv_flushing": flushing_lat,
                                         "shardkv_busy_poll_off": no_busy_poll["latency"],
                                         "redis": redis_lat, "echo": echo_lat}
        bars = {"Redis AOF Lua": rtps}
        bars.update({f"shardkv {k} shard(s)": v[0]["tps"] for k, v in scaling.items()})
        plot_bars(report, "node_throughput.png", "Bank transfers/s, 10,000 accounts, one Python client", bars,
                  "transfers/s")
        _plot_latency(report, main_lat, redis_lat, echo_lat, flushing_lat, no_busy_poll["latency"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shard_count_runs(report: Report, s: Settings, shards: int, main: bool, tmp: Path,
                     rng: random.Random, redis_run, redis_block) -> tuple[list, dict]:
    """One node with `shards` shards: load the accounts, then `s.pairs` interleaved pairs
    (redis_run(), then a shardkv run of the same length), and for the main shard count also
    the client profile (a run of its own, not timed), the two latency runs (the second in
    blocks alternating with redis_block(n)) and the paced run. Returns ([(shardkv run,
    redis run), ...], {"flushing", "after_flush", "redis", "paced"} or {})."""
    lat = {}
    with loaded_node(report, tmp, shards) as (node, conn):
        roles = {"client": psutil.Process(), **node_roles(node.pid)}
        if main:
            with profiled(report, f"node_client_{shards}shards"):
                shardkv_transfers(conn, s.profile_seconds, s.rounds_in_flight, rng)
        runs = []
        for i in range(s.pairs):
            r_redis = redis_run()
            r_node = metered(roles, lambda: shardkv_transfers(conn, s.seconds, s.rounds_in_flight, rng))
            runs.append((r_node, r_redis))
            log(f"  pair {i + 1}/{s.pairs}: redis {r_redis['tps']:,.0f}, shardkv {shards} shard(s) "
                f"{r_node['tps']:,.0f} transfers/s, ratio {r_node['tps'] / r_redis['tps']:.2f}")
        if main:
            lat["flushing"] = shardkv_latency(conn, s.latency_txns, rng, shards)
            flushed = conn.call("flush")
            if not flushed.get("ok"):
                raise RuntimeError(f"flush before the latency run failed: {flushed}")
            lat["after_flush"], lat["redis"] = interleaved_latency(conn, s, rng, shards, redis_block)
            lat["paced"] = paced_txns(conn, roles, s.paced_rate, s.paced_seconds, rng)
            report.series["node_stats"] = conn.call("stats")
    return runs, lat


def busy_poll_off_runs(report: Report, s: Settings, shards: int, tmp: Path, rng: random.Random,
                       redis_block) -> dict:
    """A node like the main one but with busy polling off ([node] busy_poll_us = 0): its
    single-txn latency (in blocks alternating with Redis's) and its CPU at the paced
    trickle, for the figures of the trade-off."""
    config = tmp / "busy-poll-off.toml"
    config.write_text("[node]\nbusy_poll_us = 0\n")
    with loaded_node(report, tmp, shards, config, "busy polling off") as (node, conn):
        latency, redis = interleaved_latency(conn, s, rng, shards, redis_block)
        return {"latency": latency, "redis": redis,
                "paced": paced_txns(conn, node_roles(node.pid), s.paced_rate, s.paced_seconds, rng)}


@contextlib.contextmanager
def loaded_node(report: Report, tmp: Path, shards: int, config: Path | None = None, label: str = ""):
    """A started node with the accounts loaded: yields (NodeProcess, Conn). On the way out
    the total balance is checked and the node stopped; a wrong total or a non-zero exit
    status becomes a note in the report."""
    what = f"{shards} shard(s)" + (f", {label}" if label else "")
    log(f"starting shardkv node with {what}")
    data_dir = tmp / (f"data-{shards}" + (f"-{label.replace(' ', '-')}" if label else ""))
    node = NodeProcess(data_dir, shards, config=config)
    conn = Conn(node.endpoint)
    try:
        load_accounts(conn)
        yield node, conn
        total = total_balance(conn)
        if total != ACCOUNTS * INITIAL:
            report.note(f"INVARIANT: shardkv total balance {total} != {ACCOUNTS * INITIAL} ({what})")
    finally:
        conn.close()
        rc = node.stop()
        if rc not in (0, None):
            report.note(f"node with {what} exited with status {rc} on SIGTERM")


def median_pair(runs: list) -> tuple:
    """The (shardkv, redis) pair whose ratio is the median (the lower middle one of an even
    count): its two runs were seconds apart, so the host's drift cancels in the ratio."""
    ordered = sorted(runs, key=lambda pair: pair[0]["tps"] / pair[1]["tps"])
    return ordered[(len(ordered) - 1) // 2]


def node_available() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None
               for m in ("supervisor.main", "node.router", "shard.worker", "shard.engine"))


def _plot_latency(report: Report, lat: dict, redis_lat: dict, echo_lat: dict,
                  flushing_lat: dict, no_busy_poll_lat: dict) -> None:
    qs = [0.5, 0.75, 0.9, 0.95, 0.99, 0.999]
    xs = [q * 100 for q in qs]
    plot_lines(report, "node_latency.png", "Single-request latency by percentile", "percentile",
               {"shardkv txn": (xs, [percentile(lat["txn"], q) * 1000 for q in qs]),
                "shardkv txn, flush running": (xs, [percentile(flushing_lat["txn"], q) * 1000 for q in qs]),
                "shardkv txn, busy polling off": (xs, [percentile(no_busy_poll_lat["txn"], q) * 1000 for q in qs]),
                "shardkv get+txn": (xs, [percentile(lat["transfer"], q) * 1000 for q in qs]),
                "Redis EVALSHA": (xs, [percentile(redis_lat["txn"], q) * 1000 for q in qs]),
                "ZeroMQ echo (no work)": (xs, [percentile(echo_lat["echo"], q) * 1000 for q in qs])}, "ms")


def _plot_cpu(report: Report, redis_cpu: dict, node_cpu: dict) -> None:
    """Stacked bars: CPU microseconds per committed transfer, by process."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = {"Redis AOF Lua": redis_cpu}
    columns.update({f"shardkv {k} shard(s)": v for k, v in node_cpu.items()})
    def group(name: str) -> str:
        return "shards" if name.startswith("shard-") else name
    groups = []
    for cpu in columns.values():
        for name in cpu:
            if group(name) not in groups:
                groups.append(group(name))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottoms = [0.0] * len(columns)
    for g in groups:
        heights = [sum(v for k, v in cpu.items() if group(k) == g) for cpu in columns.values()]
        ax.bar(range(len(columns)), heights, bottom=bottoms, label=g)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(list(columns), rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("CPU us per committed transfer")
    ax.set_title("Where the CPU of a bank transfer goes (all threads of each process)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    report.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.out_dir / "node_cpu.png", dpi=90)
    plt.close(fig)
    report.plots.append("node_cpu.png")
