"""The Grafana dashboard: generated JSON is current, has the required panels and the
`shard` variable, and every metric it queries is one the collector exports."""
import json
import re
import runpy
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.snapshots import full_state
from supervisor.metrics import make_registry

GRAFANA = Path(__file__).resolve().parents[2] / "configs" / "grafana"


def dashboard():
    return json.loads((GRAFANA / "shardkv.json").read_text())


def expressions(board):
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_dashboard_json_is_generated_from_build_script():
    build = runpy.run_path(str(GRAFANA / "build_dashboard.py"))
    assert (GRAFANA / "shardkv.json").read_text() == build["render"](), \
        "run python3 configs/grafana/build_dashboard.py"


def test_dashboard_has_uid_shard_variable_and_required_panels():
    board = dashboard()
    assert board["uid"] == "shardkv"
    (var,) = board["templating"]["list"]
    assert var["name"] == "shard" and var["query"]["query"] == "label_values(shardkv_shard_up, shard)"
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for needed in ("tps", "success rate", "p50/p90/p99", "transaction rates", "pruning", "flushes and keys",
                   "flush bytes", "rocksdb size", "rocksdb keys", "memory per process", "cpu per process",
                   "shard up", "restarts", "block height"):
        assert needed in titles, needed
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_queried_metric_is_exported():
    text = generate_latest(make_registry(full_state())).decode()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for expr in expressions(dashboard()):
        for name in re.findall(r"\bshardkv_[a-z0-9_]+", expr):
            assert name in exported, (name, expr)


def test_provisioning_points_at_the_dashboard_datasource():
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "uid: shardkv-prometheus" in datasource and "type: prometheus" in datasource
    assert "type: file" in (GRAFANA / "provisioning" / "dashboards" / "shardkv.yml").read_text()
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p.get("targets", [])}
    assert uids == {"shardkv-prometheus"}


def test_tps_and_success_rate_count_transactions_not_shard_steps():
    """They summed the shards' shardkv_txn_total: a cross-shard txn counted once per
    participant, a read-only txn that validated nowhere, one that failed as a conflict
    (an audit). They read the router's per-transaction counter now."""
    panels = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard()["panels"]}
    for title in ("TPS (committed)", "Success rate"):
        (expr,) = panels[title]
        assert "shardkv_node_txn_total" in expr and "shardkv_txn_total" not in expr, (title, expr)
    rates = " ".join(panels["Transaction rates"])
    assert "shardkv_node_txn_total" in rates and "shardkv_txn_total" not in rates
