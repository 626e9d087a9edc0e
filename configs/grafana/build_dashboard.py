"""Writes shardkv.json, the Grafana dashboard, from the panel list below.

Edit here, then run `python3 configs/grafana/build_dashboard.py`; a test checks the JSON
is up to date and an end-to-end test runs every expression against a real Prometheus.
Query conventions: `$shard` is a regex (All = .*); process series of the supervisor and
router carry shard="" and are kept by `shard=~"$shard|"`.
"""
import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "shardkv-prometheus"}
S = 'shard=~"$shard"'
RI = "$__rate_interval"

# (title, unit, kind, [(expr, legend)]); kind: "timeseries" or "stat"; width 12 unless stat.
ROWS = [
    ("Throughput", [
        # Node-wide, per transaction (the router's count): shardkv_txn_total counts
        # participant steps per shard, so it does not fit here and $shard does not apply.
        ("TPS (committed)", "reqps", "stat", [
            (f'sum(rate(shardkv_node_txn_total{{result="committed"}}[{RI}]))', "TPS")]),
        ("Success rate", "percentunit", "stat", [
            (f'sum(rate(shardkv_node_txn_total{{result="committed"}}[{RI}])) / sum(rate(shardkv_node_txn_total[{RI}]))',
             "committed / all")]),
        ("Block height", "none", "stat", [("max(shardkv_block_height)", "block")]),
        ("Commit ts", "none", "stat", [("max(shardkv_commit_ts)", "commit_ts")]),
        ("Committed steps per shard (TPS of each participant)", "reqps", "timeseries", [
            (f'sum by (shard) (rate(shardkv_txn_total{{result="committed",{S}}}[{RI}]))', "shard {{shard}}")]),
        ("Transaction rates", "reqps", "timeseries", [
            ('sum(rate(shardkv_request_duration_seconds_count{op=~"txn|batch"}[' + RI + ']))', "started (txn+batch requests)"),
            (f'sum by (result) (rate(shardkv_node_txn_total[{RI}]))', "{{result}}"),
            ('sum by (result) (rate(shardkv_router_twopc_total[' + RI + ']))', "2PC {{result}}"),
        ]),
        ("Requests by op and result (router)", "reqps", "timeseries", [
            (f'sum by (op, result) (rate(shardkv_requests_total[{RI}]))', "{{op}} {{result}}")]),
        ("2PC participant steps", "ops", "timeseries", [
            (f'sum by (result) (rate(shardkv_twopc_total{{{S}}}[{RI}]))', "{{result}}"),
            (f'sum(shardkv_prepared_txns{{{S}}})', "prepared now")]),
    ]),
    ("Latency", [
        ("Commit latency P50/P90/P99 (shard)", "s", "timeseries", [
            (f'histogram_quantile({q}, sum by (le) (rate(shardkv_txn_duration_seconds_bucket{{{S}}}[{RI}])))',
             f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]),
        ("Request latency P50/P90/P99 by op (router, end to end)", "s", "timeseries", [
            (f'histogram_quantile({q}, sum by (op, le) (rate(shardkv_request_duration_seconds_bucket[{RI}])))',
             f"{{{{op}}}} p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]),
        ("Commit P99 per shard", "s", "timeseries", [
            (f'histogram_quantile(0.99, sum by (shard, le) (rate(shardkv_txn_duration_seconds_bucket{{{S}}}[{RI}])))',
             "shard {{shard}}")]),
    ]),
    ("Flush and pruning", [
        ("Flushes and keys flushed", "short", "timeseries", [
            (f'sum by (shard) (increase(shardkv_flush_total{{{S}}}[{RI}]))', "flushes shard {{shard}}"),
            (f'sum by (shard) (rate(shardkv_flush_keys_total{{{S}}}[{RI}]))', "keys/s shard {{shard}}")]),
        ("Flush bytes", "Bps", "timeseries", [
            (f'sum by (shard) (rate(shardkv_flush_bytes_total{{{S}}}[{RI}]))', "shard {{shard}}")]),
        ("Time since last flush", "s", "timeseries", [
            (f'time() - shardkv_last_flush_timestamp_seconds{{{S}}}', "shard {{shard}}"),
            (f'shardkv_last_flush_duration_seconds{{{S}}}', "last duration shard {{shard}}")]),
        ("Last flush block", "none", "timeseries", [
            (f'shardkv_last_flush_block{{{S}}}', "shard {{shard}}"),
            (f'shardkv_shard_block_height{{{S}}}', "block height shard {{shard}}")]),
        ("Pruning / GC", "short", "timeseries", [
            (f'sum by (shard) (increase(shardkv_prune_total{{{S}}}[{RI}]))', "runs shard {{shard}}"),
            (f'sum by (shard) (increase(shardkv_pruned_versions_total{{{S}}}[{RI}]))', "versions removed shard {{shard}}")]),
        ("Read horizon and prune time", "short", "timeseries", [
            (f'shardkv_read_horizon{{{S}}}', "horizon shard {{shard}}"),
            (f'sum by (shard) (rate(shardkv_prune_duration_seconds_total{{{S}}}[{RI}]))', "prune busy shard {{shard}}"),
            (f'sum by (shard) (rate(shardkv_flush_duration_seconds_total{{{S}}}[{RI}]))', "flush busy shard {{shard}}")]),
        ("Adaptive batch writer chunk size", "short", "timeseries", [
            (f'shardkv_batch_writer_chunk_size{{{S}}}', "shard {{shard}}")]),
    ]),
    ("Storage and memory", [
        ("Keys and resident versions", "short", "timeseries", [
            (f'shardkv_keys{{{S}}}', "keys shard {{shard}}"),
            (f'shardkv_versions{{{S}}}', "resident versions shard {{shard}}"),
            ("max(shardkv_memory_budget_versions)", "version budget")]),
        ("RocksDB size", "bytes", "timeseries", [
            (f'shardkv_rocksdb_live_sst_bytes{{{S}}}', "live SST shard {{shard}}"),
            (f'shardkv_rocksdb_memtable_bytes{{{S}}}', "memtables shard {{shard}}"),
            (f'shardkv_rocksdb_block_cache_bytes{{{S}}}', "block cache shard {{shard}}"),
            (f'shardkv_rocksdb_pending_compaction_bytes{{{S}}}', "pending compaction shard {{shard}}")]),
        ("RocksDB keys", "short", "timeseries", [
            (f'shardkv_rocksdb_estimated_keys{{{S}}}', "shard {{shard}}")]),
        ("Memory per process (RSS)", "bytes", "timeseries", [
            ('shardkv_process_resident_memory_bytes{shard=~"$shard|"}', "{{component}} {{shard}}"),
            ('sum(shardkv_process_resident_memory_bytes)', "node total")]),
        ("CPU per process", "percentunit", "timeseries", [
            (f'rate(shardkv_process_cpu_seconds_total{{shard=~"$shard|"}}[{RI}])', "{{component}} {{shard}}")]),
    ]),
    ("Processes", [
        ("Shard up", "none", "timeseries", [
            (f'shardkv_shard_up{{{S}}}', "shard {{shard}}"),
            ("shardkv_router_up", "router")]),
        ("Restarts", "short", "timeseries", [
            (f'shardkv_shard_restarts_total{{{S}}}', "shard {{shard}}"),
            ("shardkv_router_restarts_total", "router")]),
        ("Snapshot age", "s", "timeseries", [
            (f'shardkv_shard_snapshot_age_seconds{{{S}}}', "shard {{shard}}")]),
    ]),
]


def panel(pid, title, unit, kind, targets, x, y, w, h):
    return {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": ({"reduceOptions": {"calcs": ["lastNotNull"]}, "graphMode": "area"} if kind == "stat"
                    else {"legend": {"displayMode": "list", "placement": "bottom"},
                          "tooltip": {"mode": "multi"}}),
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard():
    panels, pid, y = [], 1, 0
    for row_title, items in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y, x, line_h = pid + 1, y + 1, 0, 0
        for title, unit, kind, targets in items:
            w, h = (6, 4) if kind == "stat" else (12, 8)
            if x + w > 24:
                x, y, line_h = 0, y + line_h, 0
            panels.append(panel(pid, title, unit, kind, targets, x, y, w, h))
            pid, x, line_h = pid + 1, x + w, max(line_h, h)
        y += line_h
    return {
        "uid": "shardkv", "title": "shardkv node", "schemaVersion": 39, "version": 1,
        "editable": True, "tags": ["shardkv"], "timezone": "browser",
        "time": {"from": "now-15m", "to": "now"}, "refresh": "5s",
        "templating": {"list": [{
            "name": "shard", "label": "shard", "type": "query", "datasource": DS,
            "query": {"query": "label_values(shardkv_shard_up, shard)", "refId": "shard"},
            "definition": "label_values(shardkv_shard_up, shard)",
            "multi": True, "includeAll": True, "allValue": ".*", "refresh": 2, "sort": 3,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "shardkv.json"
    out.write_text(render())
    print(f"wrote {out}")
