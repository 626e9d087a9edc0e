"""A short soak: real node, shard and router SIGKILLs, invariants; exit 0 and the report exists."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "benchmarks"))


pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_short_soak_passes_every_invariant_and_writes_its_report(tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmarks/soak.py", "--duration", "2m", "--kill-every", "30", "--kill-router-every", "50",
         "--checkpoint-every", "10", "--prune-every", "8", "--check-every", "4", "--sample-every", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=420)
    doc = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, (doc["violations"], proc.stdout[-3000:])
    assert doc["passed"] is True
    counts = doc["counts"]
    assert counts["committed"] > 0 and counts["full_checks"] >= 2 and counts["scans"] >= 1
    assert counts["kills"] >= 1 and counts["router_kills"] >= 1 and counts["checkpoints"] >= 1
    assert counts["events_deleted"] > 0 and counts["events_created"] > counts["events_deleted"]
    assert len(doc["samples"]) >= 5
    assert "PASS" in (out / "report.md").read_text()
    for png in ("tps.png", "p99.png", "rss.png", "disk.png", "flush_prune.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "t=" in proc.stdout          # progress lines


def test_disk_trend_rule_flags_steady_growth_and_passes_swings():
    """The shapes two real soaks recorded (MiB every 3 s after warm-up): a data dir that
    grows ~10 MiB a minute (old RocksDB LOG files piling up) is a violation; one that
    swings 50..110 MiB with flushes and compactions is not."""
    import math
    from soak import disk_grows, first_and_last_third
    mib = 2**20
    growing = [{"disk_bytes": (150 + 0.5 * i + 20 * math.sin(i)) * mib} for i in range(800)]
    swinging = [{"disk_bytes": (80 + 30 * math.sin(i / 3)) * mib} for i in range(100)]
    assert disk_grows(*first_and_last_third(growing, "disk_bytes"))
    assert not disk_grows(*first_and_last_third(swinging, "disk_bytes"))


def test_the_2pc_settle_check_flags_records_that_stay_and_passes_ones_that_go(tmp_path):
    """The end-of-run check against 2PC leaks, on the stats answers it would see: outcome
    records that go within the window pass; one that stays (the leak an audit found in
    lost commit acks) is a violation, and so is a prepared txn left behind."""
    import argparse
    from soak import Soak

    def soak_seeing(answers):
        soak = Soak(argparse.Namespace(seed=1), tmp_path, tmp_path)
        feed = iter(answers)
        soak.call = lambda op, retry_secs=0: next(feed, answers[-1])
        return soak

    def stats(*held):
        return {"ok": True, "shards": [{"shard": i, "up": True, "prepared": p, "outcomes": o}
                                       for i, (p, o) in enumerate(held)]}
    draining = soak_seeing([stats((0, 3), (0, 2)), stats((0, 1), (0, 0)), stats((0, 0), (0, 0))])
    draining.check_2pc_settles(within_secs=5)
    assert draining.violations == []
    for left in ((0, 1), (1, 0)):
        stuck = soak_seeing([stats((0, 0), left)])
        stuck.check_2pc_settles(within_secs=0.5)
        assert [v["invariant"] for v in stuck.violations] == ["2PC state settles"]


def test_the_event_check_flags_a_deleted_key_that_came_back_and_a_created_one_lost(tmp_path):
    """Deleted keys must stay deleted (the weak point of the project shardkv replaces:
    tombstones never flushed, so deleted keys came back): the check compares a scan of
    the event keys, page by page at one ts, with the model's live keys."""
    import argparse
    from soak import Soak, event_key

    def soak_scanning(keys, live):
        soak = Soak(argparse.Namespace(seed=1), tmp_path, tmp_path)
        soak.events_live = live
        pages = iter([{"ok": True, "ts": 9, "items": [[k, b"e", 3] for k in keys[:2]], "more": len(keys) > 2},
                      {"ok": True, "ts": 9, "items": [[k, b"e", 3] for k in keys[2:]], "more": False}])
        soak.call = lambda op, retry_secs=0, **fields: next(pages)
        soak.check_events()
        return [v["invariant"] for v in soak.violations]

    live = [event_key(i) for i in range(3, 6)]
    assert soak_scanning(live, live) == []
    assert soak_scanning([event_key(1)] + live, live) == ["deleted keys stay deleted"]
    assert soak_scanning(live[:2], live) == ["no acknowledged transfer lost"]


@pytest.mark.parametrize("stop", ["SIGINT, started as a shell's background job", "SIGTERM"])
def test_a_signal_stops_the_soak_with_a_report_of_the_run_so_far(tmp_path, stop):
    """A soak of hours keeps its evidence on disk while it runs (samples.jsonl as samples
    are taken, the report so far marked RUNNING every --report-every), and stopped early
    still leaves its report: marked interrupted, exit status 130, the samples so far, the
    node stopped. By SIGINT (Ctrl-C) also when started as a shell's background job, which
    starts with SIGINT ignored (`kill -INT` did nothing to such a soak), or by SIGTERM."""
    import os
    import signal
    out = tmp_path / "soak"
    background = stop.startswith("SIGINT")
    proc = subprocess.Popen(
        [sys.executable, "scripts/benchmarks/soak.py", "--duration", "10m", "--sample-every", "1",
         "--report-every", "0.5", "--kill-every", "0", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None)
    try:
        sampled = False
        for line in proc.stdout:   # a partial report written after the first sample
            if " t=" in line:
                sampled = True
            elif sampled and "report so far" in line:
                break
        partial = json.loads((out / "report.json").read_text())
        assert partial["passed"] is False and partial["running_at"] >= 0.5
        assert "RUNNING" in (out / "report.md").read_text()
        streamed = [json.loads(row) for row in (out / "samples.jsonl").read_text().splitlines()]
        assert len(streamed) >= len(partial["samples"]) >= 1
        assert streamed[0]["t"] == partial["samples"][0]["t"] and streamed[0]["rss_total"] > 0
        assert (out / "tps.png").read_bytes()[:4] == b"\x89PNG"
        os.kill(proc.pid, signal.SIGINT if background else signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest[-2000:]
    assert "Traceback" not in rest
    doc = json.loads((out / "report.json").read_text())
    assert doc["passed"] is False and doc["interrupted_at"] > 0 and not doc["violations"]
    assert doc["running_at"] is None
    assert len(doc["samples"]) >= len(partial["samples"])
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(doc["samples"])
    assert "INTERRUPTED" in (out / "report.md").read_text()
