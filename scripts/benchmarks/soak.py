"""`scripts/soak --duration 2m|1h|24h`: endurance run of a real node with invariants.

Workload (one client, rounds one after another so every check is exact):
transfers between accounts across shards (`get` + `batch`), one txn creating new event
keys and deleting the oldest ones (a state that creates and deletes keys all the time,
at most EVENTS_LIVE live), a `block` per round (small `blocks_per_flush`, so auto-flush
runs all the time), snapshot reads and paginated scans
at one `at`, periodic checkpoints (the oldest deleted) and prunes (plus auto-prune), and
a SIGKILL of a random shard pid (from `stats`) every --kill-every, and of the router every
--kill-router-every. Kills come between rounds, right after a round was answered: the
router may not have sent, or the shards applied, the commits it just answered.

Invariants, checked continuously; any violation makes the exit status 1:
- total balance: every full read, snapshot read and scan sums to the initial total;
- no acknowledged transfer lost: a ledger (model balances) of acknowledged transfers must
  equal the node's balances exactly; a transfer with outcome "unknown" is resolved by
  reading its two accounts (applied or not, nothing in between);
- commit_ts strictly increasing across acknowledged transfers;
- deleted keys stay deleted and created ones stay: at every full check a scan of the
  event keys must list exactly the live ones of the model (the event txn is idempotent,
  so one with an unknown outcome is repeated until it is acknowledged);
- bounded RSS with no upward trend (after warm-up) and bounded disk with pruning on;
- at the end, with the load stopped: no prepared txn and no outcome record left on any
  shard (a leak there grows with every kill).
Report: reports/soak-<timestamp>/ report.md, report.json, PNG plots over time. A run of
hours must leave its evidence even if it never reaches its end (the machine goes away, the
driver is killed): every sample is appended to samples.jsonl as it is taken, and the
report so far (marked RUNNING) is rewritten every --report-every seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from benchlib import ROOT, Report, caller_path, plot_lines, timestamp_dir  # noqa: E402
from procs import Conn, NodeProcess  # noqa: E402
from shard.histogram import Histogram, quantile  # noqa: E402

ACCOUNTS = 2_000
INITIAL = 10_000
PER_ROUND = 50
PREFIX = b"acct"
EVENT_PREFIX = b"evt"
EVENTS_LIVE = 200          # event keys alive at once; each round deletes the oldest beyond it
EVENT_VALUE = b"e" * 32


def account(i: int) -> bytes:
    return PREFIX + b"%05d" % i


def event_key(seq: int) -> bytes:
    return EVENT_PREFIX + b"%012d" % seq


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: use e.g. 90s, 2m, 1h, 24h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def soak_config(path: Path, args) -> Path:
    """configs/node.toml with a fast auto-flush / auto-prune cadence."""
    text = (ROOT / "configs" / "node.toml").read_text()
    for key, value in (("blocks_per_flush", args.blocks_per_flush), ("interval_secs", 5),
                       ("auto_interval_secs", args.prune_every), ("keep_versions", 3)):
        text, n = re.subn(rf"(?m)^{key}\s*=\s*[^#\n]*", f"{key} = {value}  ", text, count=1)
        if n != 1:
            raise SystemExit(f"soak: configs/node.toml has no `{key}` line to override")
    path.write_text(text)
    return path


def first_and_last_third(rows: list, field: str) -> tuple[float, float]:
    """Mean of `field` over the first and over the last third of the samples."""
    third = len(rows) // 3
    return (sum(r[field] for r in rows[:third]) / third,
            sum(r[field] for r in rows[-third:]) / third)


def disk_grows(early: float, late: float) -> bool:
    """With pruning on and a fixed set of accounts the data dir levels off; flushes,
    compactions and checkpoints only make it swing. A 45-minute run whose restarts each
    left a RocksDB info LOG behind went 174 -> 402 MiB (third means after warm-up) and
    passed the old rule (3x + 128 MiB); healthy runs stay within a few tens of MiB."""
    return late > 1.5 * early + 64 * 2**20


class Violations(list):
    def add(self, what: str, detail: str) -> None:
        self.append({"invariant": what, "detail": detail, "at": time.time()})
        log(f"VIOLATION {what}: {detail}")


class Soak:
    def __init__(self, args, out: Path, work: Path):
        self.args = args
        self.out = out
        self.work = work
        self.rng = random.Random(args.seed)
        self.violations = Violations()
        self.interrupted_at: float | None = None   # seconds into the run when Ctrl-C came
        self.model = {account(i): INITIAL for i in range(ACCOUNTS)}
        self.total = ACCOUNTS * INITIAL
        self.last_commit_ts = 0
        self.height = 0
        self.events_live: list[bytes] = []         # the model's live event keys, oldest first
        self.next_event = 0
        self.counts = {"committed": 0, "conflict": 0, "unavailable": 0, "unknown_resolved": 0, "kills": 0,
                       "router_kills": 0, "events_created": 0, "events_deleted": 0,
                       "checkpoints": 0, "prunes": 0, "scans": 0, "snapshot_reads": 0, "full_checks": 0}
        self.samples: list[dict] = []
        self.window_hist = Histogram()
        self.window_committed = 0
        self.checkpoints: list[str] = []
        self.running_at: float | None = None       # seconds into the run, while a report is partial
        self.samples_log = None                    # samples.jsonl, one JSON object per sample

    # -- requests with retry on `unavailable` --------------------------------------------
    def call(self, op: str, retry_secs: float = 30.0, retry_on: tuple = ("unavailable",), **fields) -> dict:
        """The reply to op, asked again every 50 ms for up to retry_secs while its error
        code is one of retry_on (only `unavailable` retries are counted)."""
        deadline = time.monotonic() + retry_secs
        while True:
            try:
                reply = self.conn.call(op, **fields)
            except TimeoutError:
                reply = {"ok": False, "error": {"code": "unavailable", "message": "client timeout"}}
            if reply.get("ok") or reply["error"]["code"] not in retry_on or time.monotonic() > deadline:
                return reply
            if reply["error"]["code"] == "unavailable":
                self.counts["unavailable"] += 1
            time.sleep(0.05)

    # -- workload steps -----------------------------------------------------------------
    def load(self) -> None:
        for start in range(0, ACCOUNTS, 1000):
            reply = self.call("txn", writes=[[account(i), b"%d" % INITIAL] for i in range(start, min(ACCOUNTS, start + 1000))])
            if not reply.get("ok"):
                raise SystemExit(f"soak: loading accounts failed: {reply}")
            self.last_commit_ts = reply["commit_ts"]

    def transfer_round(self) -> None:
        picks = self.rng.sample(range(ACCOUNTS), 2 * PER_ROUND)
        pairs = [(account(picks[2 * i]), account(picks[2 * i + 1])) for i in range(PER_ROUND)]
        t0 = time.perf_counter()
        got = self.call("get", keys=[k for p in pairs for k in p])
        if not got.get("ok"):
            return
        txns, amounts = [], []
        for i, (a, b) in enumerate(pairs):
            va, vb = int(got["values"][2 * i]), int(got["values"][2 * i + 1])
            amount = self.rng.randint(1, 5) if va >= 5 else 0
            amounts.append(amount)
            txns.append({"reads": [[a, got["versions"][2 * i]], [b, got["versions"][2 * i + 1]]],
                         "writes": [[a, b"%d" % (va - amount)], [b, b"%d" % (vb + amount)]]})
        try:
            reply = self.conn.call("batch", txns=txns)
        except TimeoutError:
            reply = {"ok": False, "error": {"code": "unavailable", "message": "client timeout"}}
        self.window_hist.observe(time.perf_counter() - t0)
        results = reply["results"] if reply.get("ok") else [reply] * len(txns)
        unknown = []
        for (a, b), amount, r in zip(pairs, amounts, results):
            if r.get("ok"):
                ts = r["commit_ts"]
                if ts <= self.last_commit_ts:
                    self.violations.add("monotonic commit_ts", f"commit_ts {ts} after {self.last_commit_ts}")
                self.last_commit_ts = max(self.last_commit_ts, ts)
                self.model[a] -= amount
                self.model[b] += amount
                self.counts["committed"] += 1
                self.window_committed += 1
            elif r["error"]["code"] == "conflict":
                self.counts["conflict"] += 1
            elif r["error"]["code"] == "unavailable" and r["error"].get("outcome") == "aborted":
                self.counts["unavailable"] += 1
            else:
                unknown.append((a, b, amount))
        if unknown:
            self.resolve(unknown)

    def event_round(self) -> None:
        """Create events_per_round event keys and delete the oldest beyond EVENTS_LIVE, in
        one txn of blind writes: the same writes again leave the same state, so a txn
        whose outcome is unknown (a kill) is simply repeated until acknowledged."""
        n = self.args.events_per_round
        if n <= 0:
            return
        created = [event_key(self.next_event + i) for i in range(n)]
        deleted = self.events_live[:max(0, len(self.events_live) + n - EVENTS_LIVE)]
        writes = [[k, EVENT_VALUE] for k in created] + [[k, None] for k in deleted]
        # conflict too: an attempt whose outcome is unknown may still hold its keys
        # prepared until the router's recovery decides it
        reply = self.call("txn", retry_secs=60, retry_on=("unavailable", "conflict"), writes=writes)
        if not reply.get("ok"):
            self.violations.add("availability", f"event txn failed: {reply.get('error')}")
            return
        self.next_event += n
        self.events_live = self.events_live[len(deleted):] + created
        self.counts["events_created"] += n
        self.counts["events_deleted"] += len(deleted)

    def check_events(self) -> None:
        """A scan of the event keys lists exactly the model's live ones: a deleted key that
        came back (a tombstone lost by a flush, a prune or a restart) or a created key
        that went missing is a violation."""
        scanned = self.scan_all(EVENT_PREFIX, "event scan")
        if scanned is None:
            return
        seen = [k for k, _, _ in scanned[0]]
        live = set(self.events_live)
        came_back = [k for k in seen if k not in live]
        if came_back:
            self.violations.add("deleted keys stay deleted",
                                f"{len(came_back)} event keys listed that were deleted or never "
                                f"created, e.g. {came_back[:3]}")
        missing = live.difference(seen)
        if missing:
            self.violations.add("no acknowledged transfer lost",
                                f"{len(missing)} acknowledged event keys missing, e.g. {sorted(missing)[:3]}")

    def resolve(self, unknown) -> None:
        """Outcome unknown: the accounts now hold either the before or the after state."""
        keys = [k for a, b, _ in unknown for k in (a, b)]
        got = self.call("get", keys=keys, retry_secs=60)
        if not got.get("ok"):
            self.violations.add("availability", f"could not read accounts to resolve unknown outcomes: {got}")
            return
        for i, (a, b, amount) in enumerate(unknown):
            va, vb = int(got["values"][2 * i]), int(got["values"][2 * i + 1])
            if (va, vb) == (self.model[a], self.model[b]):
                pass                                      # not applied
            elif (va, vb) == (self.model[a] - amount, self.model[b] + amount):
                self.model[a], self.model[b] = va, vb     # applied
            else:
                self.violations.add("atomic transfer", f"{a!r}/{b!r}: {va}/{vb}, expected "
                                    f"{self.model[a]}/{self.model[b]} or the transfer of {amount} applied")
                self.model[a], self.model[b] = va, vb
            self.counts["unknown_resolved"] += 1

    def full_check(self) -> None:
        """Ledger: every balance equals the model of acknowledged transfers."""
        keys = list(self.model)
        got = self.call("get", keys=keys, retry_secs=60)
        if not got.get("ok"):
            self.violations.add("availability", f"full read failed: {got.get('error')}")
            return
        actual = [int(v) if v is not None else None for v in got["values"]]
        if sum(v or 0 for v in actual) != self.total:
            self.violations.add("total balance", f"{sum(v or 0 for v in actual)} != {self.total}")
        wrong = [(k, self.model[k], v) for k, v in zip(keys, actual) if v != self.model[k]]
        if wrong:
            self.violations.add("no acknowledged transfer lost",
                                f"{len(wrong)} accounts differ from the ledger, e.g. {wrong[:3]}")
            for k, _, v in wrong:
                self.model[k] = v or 0
        self.check_events()
        self.counts["full_checks"] += 1

    def snapshot_read_and_scan(self) -> None:
        at = self.last_commit_ts
        got = self.call("get", keys=list(self.model), at=at)
        if got.get("ok"):
            total = sum(int(v) for v in got["values"] if v is not None)
            if total != self.total:
                self.violations.add("total balance", f"snapshot read at {at}: {total}")
            self.counts["snapshot_reads"] += 1
        elif got["error"]["code"] != "too_old":
            self.violations.add("availability", f"snapshot read failed: {got['error']}")
        scanned = self.scan_all(PREFIX, "scan")
        if scanned is None:
            return
        items, scan_at = scanned
        seen, total = len(items), sum(int(v) for _, v, _ in items)
        if seen != ACCOUNTS or total != self.total:
            self.violations.add("total balance", f"scan at {scan_at}: {seen} accounts, total {total}")
        self.counts["scans"] += 1

    def scan_all(self, prefix: bytes, what: str) -> tuple[list, int] | None:
        """(every [key, value, version] under prefix, the ts they were read at): a paged
        scan, every page at the first page's ts, so one consistent cut. None when a page
        failed: too_old (a prune passed the cut between pages) is expected, anything else
        is an availability violation."""
        items, start, scan_at = [], None, None
        while True:
            fields = {"prefix": prefix, "limit": 500}
            if start is not None:
                fields["start"] = start
            if scan_at is not None:
                fields["at"] = scan_at
            page = self.call("scan", **fields)
            if not page.get("ok"):
                if page["error"]["code"] != "too_old":
                    self.violations.add("availability", f"{what} failed: {page['error']}")
                return None
            scan_at = page["ts"]
            items += page["items"]
            if not page["more"] or not page["items"]:
                return items, scan_at
            start = page["items"][-1][0] + b"\x00"

    def block(self) -> None:
        self.height += 1
        reply = self.call("block", height=self.height)
        if not reply.get("ok") and reply["error"]["code"] != "unavailable":
            self.violations.add("block", f"block {self.height}: {reply['error']}")

    def checkpoint(self) -> None:
        reply = self.call("checkpoint", action="create", name=f"soak-{self.counts['checkpoints']}")
        if not reply.get("ok"):
            if reply["error"]["code"] != "unavailable":
                self.violations.add("checkpoint", f"create failed: {reply['error']}")
            return
        self.counts["checkpoints"] += 1
        self.checkpoints.append(reply["name"])
        while len(self.checkpoints) > 2:       # keep disk bounded
            self.call("checkpoint", action="delete", name=self.checkpoints.pop(0))

    def prune(self) -> None:
        reply = self.call("prune", keep_versions=3)
        if reply.get("ok"):
            self.counts["prunes"] += 1

    def kill_random_shard(self) -> None:
        stats = self.call("stats")
        if not stats.get("ok"):
            return
        shards = [s for s in stats["shards"] if s.get("up") and s.get("pid")]
        if not shards:
            return
        victim = self.rng.choice(shards)
        self.sigkill(victim["pid"], f"shard {victim['shard']}", "kills")

    def kill_router(self) -> None:
        stats = self.call("stats")
        pid = stats.get("node", {}).get("router_pid") if stats.get("ok") else None
        if pid:
            self.sigkill(pid, "router", "router_kills")

    def sigkill(self, pid: int, what: str, counter: str) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return                      # gone already (restarting): not counted
        self.counts[counter] += 1
        log(f"SIGKILL {what} pid {pid}")

    # -- sampling -------------------------------------------------------------------------
    def sample(self, t: float, dt: float) -> dict:
        stats = self.call("stats", retry_secs=2)
        names = {self.node.pid: "supervisor"}
        flushes = prune_removed = 0
        if stats.get("ok"):
            node = stats.get("node", {})
            if node.get("router_pid"):
                names[node["router_pid"]] = "router"
            for s in stats["shards"]:
                if s.get("pid"):
                    names[s["pid"]] = f"shard-{s['shard']}"
                flushes += (s.get("flush") or {}).get("flush_count", 0) or 0
                prune_removed += (s.get("prune") or {}).get("versions_removed", 0) or 0
        rss = {}
        for pid, name in names.items():
            try:
                rss[name] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        snap = self.window_hist.snapshot()
        row = {"t": t, "tps": self.window_committed / dt if dt else 0.0,
               "p99_ms": quantile(snap, 0.99) * 1000 if snap["count"] else None,
               "rss": rss, "rss_total": sum(rss.values()), "disk_bytes": dir_bytes(self.data_dir),
               "flush_count": flushes, "versions_pruned": prune_removed, **self.counts}
        self.window_hist.reset()
        self.window_committed = 0
        self.samples.append(row)
        if self.samples_log is not None:
            self.samples_log.write(json.dumps(row) + "\n")
            self.samples_log.flush()
        return row

    # -- the run --------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        self.data_dir = self.work / "data"
        config = soak_config(self.work / "soak.toml", a)
        log(f"starting node: {a.shards} shards, data {self.data_dir}, duration {a.duration:.0f}s")
        self.node = NodeProcess(self.data_dir, a.shards, config=config)
        self.conn = Conn(self.node.endpoint, timeout=10)
        self.out.mkdir(parents=True, exist_ok=True)
        self.samples_log = open(self.out / "samples.jsonl", "w")
        try:
            self.load()
            started = time.monotonic()
            end = started + a.duration
            next_at = {"sample": started + a.sample_every, "check": started + a.check_every,
                       "checkpoint": started + a.checkpoint_every, "prune": started + a.prune_every,
                       "kill": started + a.kill_every, "kill_router": started + a.kill_router_every,
                       "report": started + a.report_every if a.report_every > 0 else float("inf")}
            try:
                self.run_rounds(started, end, next_at)
            except KeyboardInterrupt:
                # Ctrl-C in a terminal reaches the node too (same process group), which then
                # stops gracefully: no final checks against it, just the report so far.
                self.interrupted_at = time.monotonic() - started
                log(f"interrupted after {self.interrupted_at:.0f}s: writing the report so far")
            if self.interrupted_at is None:
                self.full_check()
                self.snapshot_read_and_scan()
                self.check_2pc_settles()
            self.check_resources()
        finally:
            self.samples_log.close()
            self.conn.close()
            rc = self.node.stop()
            if rc not in (0, None):
                self.violations.add("graceful stop", f"node exited with status {rc} on SIGTERM")
        self.write_report()
        if self.violations:
            return 1
        return 130 if self.interrupted_at is not None else 0

    def run_rounds(self, started: float, end: float, next_at: dict) -> None:
        a = self.args
        last_sample = started
        while time.monotonic() < end:
            self.transfer_round()
            self.event_round()
            self.block()
            now = time.monotonic()
            if now >= next_at["check"]:
                self.full_check()
                self.snapshot_read_and_scan()
                next_at["check"] = now + a.check_every
            if now >= next_at["checkpoint"]:
                self.checkpoint()
                next_at["checkpoint"] = now + a.checkpoint_every
            if now >= next_at["prune"]:
                self.prune()
                next_at["prune"] = now + a.prune_every
            if a.kill_every > 0 and now >= next_at["kill"]:
                self.kill_random_shard()
                next_at["kill"] = now + a.kill_every
            if a.kill_router_every > 0 and now >= next_at["kill_router"]:
                self.kill_router()
                next_at["kill_router"] = now + a.kill_router_every
            if now >= next_at["sample"]:
                row = self.sample(now - started, now - last_sample)
                last_sample = now
                next_at["sample"] = now + a.sample_every
                log(f"t={row['t']:6.0f}s tps={row['tps']:8.0f} p99={row['p99_ms'] or 0:7.2f}ms "
                    f"rss={row['rss_total'] / 2**20:6.0f}MiB disk={row['disk_bytes'] / 2**20:6.1f}MiB "
                    f"flushes={row['flush_count']} pruned={row['versions_pruned']} kills={self.counts['kills']}+{self.counts['router_kills']} "
                    f"violations={len(self.violations)}")
            if now >= next_at["report"]:
                self.running_at = now - started
                try:
                    self.write_report()
                finally:   # Ctrl-C may land in here: the final report must not say RUNNING
                    self.running_at = None
                next_at["report"] = time.monotonic() + a.report_every

    def check_2pc_settles(self, within_secs: float = 15.0) -> None:
        """With the load stopped, no shard may keep a prepared txn or an outcome record:
        every 2PC txn was decided, and a record goes once every participant applied the
        commit (forgets ride with pings at the latest). One that stays is a leak that would
        grow over a day of kills (the kind an audit found in lost commit acks)."""
        deadline = time.monotonic() + within_secs
        held = None
        while time.monotonic() < deadline:
            stats = self.call("stats", retry_secs=2)
            if stats.get("ok") and all(s.get("up") for s in stats["shards"]):
                held = {s["shard"]: (s.get("prepared", 0), s.get("outcomes", 0)) for s in stats["shards"]}
                if not any(p or o for p, o in held.values()):
                    return
            time.sleep(0.2)       # polls the condition; pings carry the forgets every 0.2 s
        self.violations.add("2PC state settles", f"(prepared, outcome records) per shard after "
                                                 f"{within_secs:.0f} s without load: {held}")

    def check_resources(self) -> None:
        """RSS and disk are bounded, and RSS does not trend upward after warm-up."""
        a = self.args
        rows = [r for r in self.samples if r["t"] >= a.warmup]
        if not rows:
            return
        peak_rss = max(r["rss_total"] for r in rows)
        if peak_rss > a.max_rss_mb * 2**20:
            self.violations.add("bounded RSS", f"peak {peak_rss / 2**20:.0f} MiB > {a.max_rss_mb} MiB")
        peak_disk = max(r["disk_bytes"] for r in rows)
        if peak_disk > a.max_disk_mb * 2**20:
            self.violations.add("bounded disk", f"peak {peak_disk / 2**20:.0f} MiB > {a.max_disk_mb} MiB")
        if len(rows) >= 6:
            early, late = first_and_last_third(rows, "rss_total")
            # Growth must be both relative and absolute to count: a restarted shard or an
            # allocator's slack moves RSS by a few MiB without any leak.
            if late > early * (1 + a.rss_growth) and late - early > 64 * 2**20:
                self.violations.add("no RSS upward trend",
                                    f"mean RSS {early / 2**20:.0f} MiB -> {late / 2**20:.0f} MiB")
            early_d, late_d = first_and_last_third(rows, "disk_bytes")
            if disk_grows(early_d, late_d):
                self.violations.add("bounded disk with pruning",
                                    f"mean disk {early_d / 2**20:.0f} MiB -> {late_d / 2**20:.0f} MiB")

    def write_report(self) -> None:
        rep = Report(title="shardkv soak", quick=False, out_dir=self.out)
        ts = [r["t"] for r in self.samples]
        if self.samples:
            plot_lines(rep, "tps.png", "Committed transfers/s", "seconds", {"tps": (ts, [r["tps"] for r in self.samples])},
                       "transfers/s")
            plot_lines(rep, "p99.png", "Round (get + batch) P99 latency", "seconds",
                       {"p99 ms": (ts, [r["p99_ms"] or 0 for r in self.samples])}, "ms")
            names = sorted({n for r in self.samples for n in r["rss"]})
            plot_lines(rep, "rss.png", "RSS per process", "seconds",
                       {n: (ts, [r["rss"].get(n, 0) / 2**20 for r in self.samples]) for n in names}, "MiB")
            plot_lines(rep, "disk.png", "Data dir bytes", "seconds",
                       {"disk MiB": (ts, [r["disk_bytes"] / 2**20 for r in self.samples])}, "MiB")
            plot_lines(rep, "flush_prune.png", "Flush and prune activity (cumulative)", "seconds",
                       {"flushes": (ts, [r["flush_count"] for r in self.samples]),
                        "checkpoints": (ts, [r["checkpoints"] for r in self.samples]),
                        "kills": (ts, [r["kills"] for r in self.samples])}, "count",
                       y2={"versions pruned": (ts, [r["versions_pruned"] for r in self.samples])},
                       y2label="versions")
        invariants = ["total balance", "no acknowledged transfer lost", "monotonic commit_ts", "atomic transfer",
                      "deleted keys stay deleted",
                      "bounded RSS", "no RSS upward trend", "bounded disk", "bounded disk with pruning",
                      "availability", "2PC state settles", "graceful stop"]
        failed = {v["invariant"] for v in self.violations}
        md = ["# shardkv soak", "",
              f"Duration {self.args.duration:.0f}s, {self.args.shards} shards, seed {self.args.seed}. "
              f"Result: **{self.verdict()}**.", "",
              "| invariant | status |", "|---|---|"]
        md += [f"| {name} | {'**violated**' if name in failed else 'ok'} |" for name in invariants]
        md += ["", "| counter | value |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in self.counts.items()]
        if self.violations:
            md += ["", "## Violations", ""] + [f"- {v['invariant']}: {v['detail']}" for v in self.violations[:50]]
        md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in rep.plots]
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomically(self.out / "report.md", "\n".join(md) + "\n")
        write_atomically(self.out / "report.json", json.dumps(
            {"args": vars(self.args),
             "passed": not self.violations and self.interrupted_at is None and self.running_at is None,
             "running_at": self.running_at, "interrupted_at": self.interrupted_at, "violations": self.violations,
             "counts": self.counts, "samples": self.samples, "plots": rep.plots}, indent=1, default=str))
        if self.running_at is None:
            log(f"report: {self.out / 'report.md'} ({self.verdict()})")
        else:
            log(f"report so far: {self.out / 'report.md'} ({self.verdict()})")

    def verdict(self) -> str:
        if self.running_at is not None:
            so_far = "violations so far" if self.violations else "no violation so far"
            return (f"RUNNING ({self.running_at:.0f}s of {self.args.duration:.0f}s), {so_far}; "
                    "the resource trend checks and the final ledger check run at the end")
        if self.violations:
            return "FAIL"
        if self.interrupted_at is not None:
            return (f"INTERRUPTED after {self.interrupted_at:.0f}s, no violation so far "
                    "(the final ledger check did not run)")
        return "PASS"


def write_atomically(path: Path, text: str) -> None:
    """Replace path with text; a reader (a person, a script) never sees half a report,
    even while a long run rewrites it every --report-every seconds."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            total += st.st_blocks * 512      # hard-linked checkpoint files count once per link: an upper bound
    return total


def stop_early_on_signals() -> None:
    """SIGINT and SIGTERM both end a run early, with the report so far (run() catches the
    KeyboardInterrupt). SIGINT is set explicitly because a shell starts a background job
    (`scripts/soak ... &`, `nohup`) with SIGINT ignored, which Python then keeps: `kill
    -INT` of such a soak did nothing, and the node it had stopped left it retrying."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=parse_duration, default=parse_duration("2m"), help="e.g. 90s, 2m, 1h, 24h")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--out", type=Path, help="report directory (default reports/soak-<timestamp>)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sample-every", type=float, default=3.0, help="seconds between progress lines / samples")
    p.add_argument("--check-every", type=float, default=5.0, help="seconds between full ledger checks")
    p.add_argument("--checkpoint-every", type=float, default=20.0)
    p.add_argument("--prune-every", type=float, default=15.0, help="explicit prune op and auto-prune interval")
    p.add_argument("--kill-every", type=float, default=30.0, help="SIGKILL a random shard this often (0 = never)")
    p.add_argument("--kill-router-every", type=float, default=300.0, help="SIGKILL the router this often (0 = never)")
    p.add_argument("--blocks-per-flush", type=int, default=20)
    p.add_argument("--events-per-round", type=int, default=10,
                   help="event keys created (and as many old ones deleted) per round (0 = none)")
    p.add_argument("--warmup", type=float, default=None, help="seconds ignored by the RSS/disk trend checks")
    p.add_argument("--max-rss-mb", type=float, default=2048)
    p.add_argument("--max-disk-mb", type=float, default=4096)
    p.add_argument("--rss-growth", type=float, default=0.5, help="allowed relative growth of mean RSS")
    p.add_argument("--report-every", type=float, default=600.0,
                   help="seconds between reports of the run so far (0 = only at the end)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(300.0, args.duration * 0.25)
    out = caller_path(args.out) if args.out else timestamp_dir().with_name("soak-" + timestamp_dir().name)
    work = Path(tempfile.mkdtemp(prefix="shardkv-soak-"))
    stop_early_on_signals()
    try:
        return Soak(args, out, work).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
