"""`scripts/bench node --quick`: real node + real redis-server; structure only, never timing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "benchmarks"))


pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_node_quick_compares_with_redis_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "scripts/benchmarks/main.py", "node", "--quick", "--shards", "1,2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert not [n for n in doc["notes"] if "INVARIANT" in n or "exited" in n], doc["notes"]
    names = [f["name"] for f in doc["figures"]]
    main = next(f for f in doc["figures"] if f["name"].startswith("transfers/s, 2 shards"))
    assert main["peer"].startswith("Redis") and main["peer_value"] > 0 and main["value"] > 0
    assert main["ratio"] == pytest.approx(main["value"] / main["peer_value"])
    assert any(n.startswith("transfers/s, 1 shard") for n in names)
    assert any(n.startswith("single txn latency P99") for n in names)
    assert any(n.startswith("single txn latency P50") for n in names)
    floor = next(f for f in doc["figures"] if f["name"].startswith("ZeroMQ echo round trip P99"))
    assert floor["value"] > 0 and floor["peer"].startswith("Redis")
    assert len(doc["series"]["node_latency"]["echo"]["echo"]) > 0
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| node |")]
    assert len(rows) == len(doc["figures"])
    for png in ("node_throughput.png", "node_latency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert any(p.startswith("node_client_") for p in doc["profiles"])
