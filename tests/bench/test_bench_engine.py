"""`scripts/bench engine --quick`: the report has its structure (never timing asserts)."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_engine_quick_writes_table_json_plots_and_profiles(tmp_path):
    out = tmp_path / "report"
    # a relative --out is relative to where scripts/bench was run (it names that directory
    # in SHARDKV_CALLER_CWD), not to the repo root it runs in
    env = {**os.environ, "SHARDKV_CALLER_CWD": str(tmp_path)}
    proc = subprocess.run([sys.executable, "scripts/benchmarks/main.py", "engine", "--quick", "--out", "report"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| engine |")]
    names = [row.split("|")[2].strip() for row in table]
    assert "raw WriteBatch(1000) WAL off" in names
    assert "raw WriteBatch(1000) WAL on" in names
    assert any(n.startswith("batch writes, adaptive") for n in names)
    doc = json.loads((out / "report.json").read_text())
    assert {"figures", "series", "plots", "profiles", "environment", "quick"} <= set(doc)
    assert doc["quick"] is True
    fig = next(f for f in doc["figures"] if f["name"] == "raw WriteBatch(1000) WAL on")
    assert fig["peer"] == "raw WAL off" and fig["ratio"] > 0
    for f in doc["figures"]:
        assert {"name", "value", "unit", "peer", "peer_value", "ratio", "target", "met"} <= set(f)
    for png in ("batch_writer_modes.png", "batch_writer_trace.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in doc["plots"]
    assert doc["series"]["batch_writer_trace"]["size"], "the adaptive run left a CSV trace"
    assert doc["profiles"] and all((out / p).exists() for p in doc["profiles"])
    assert "| engine | raw WriteBatch(1000) WAL off |" in (out / "report.md").read_text()
    if "shard/engine.py is not on main yet" not in " ".join(doc["notes"]):
        assert any(n.startswith("engine flush path") for n in names)
        # Both flush comparisons side by side: the target applies to the like-for-like one.
        figs = {f["name"]: f for f in doc["figures"]}
        fair = figs["engine flush path vs like-for-like raw"]
        assert fair["peer"] == "raw WriteBatch WAL off (same rows, same options, incl. memtable flush)"
        assert fair["target"] == 0.9 and fair["ratio"] > 0
        naive = figs["engine flush path vs naive raw"]
        assert naive["peer"].startswith("NAIVE") and naive["target"] is None and naive["ratio"] > 0
        pairs = doc["series"]["flush_pairs"]
        assert len(pairs["ratio"]) % 2 == 1 and len(pairs["ratio"]) == len(pairs["raw_keys_per_sec"])
        assert fair["ratio"] == pytest.approx(statistics.median(pairs["ratio"])), "the median pair is reported"
        split = [n for n in names if n.startswith("flush split: ")]
        assert len(split) == 5, split
        for name in split:
            assert figs[name]["value"] >= 0 and figs[name]["unit"] == "s"
        # the flushed memtable is freed inside engine.flush(): timed as its own phase
        assert figs["flush split: freeing the flushed memtable (release_step slices)"]["value"] > 0
        assert not [n for n in doc["notes"] if "failed" in n], doc["notes"]
