"""A real Prometheus (started by scripts/monitor) scrapes the supervisor's metrics
endpoint, loads the alert rules, and answers every Grafana dashboard query."""
import os

import pytest

from tests.observability.prom import PROMETHEUS, dashboard_queries, monitor, query, rule_names, wait_for
from tests.observability.snapshots import full_state, router_snapshot, shard_snapshot
from supervisor.http import start_metrics_server

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and os.environ.get("CI") != "true",   # on CI a missing prometheus must fail
    reason="prometheus missing (scripts/test installs it)")


def test_monitor_scrapes_node_metrics_and_every_dashboard_query_has_data():
    state = full_state(shards=2)
    server = start_metrics_server("127.0.0.1", 0, state)
    try:
        with monitor(server.port) as prom:
            names = wait_for(lambda: rule_names(prom), 10, "alert rules to load")
            assert {"ShardDown", "NoFlushRecently", "DiskGrowth", "RssNearBudget"} <= names

            # counters move between scrapes, like a node under load
            def advance(step):
                for i in range(2):
                    state.update("shard", i, shard_snapshot(i, committed=10 + step, flushes=2 + step))
                state.update("router", None, router_snapshot(gets=4 + step))
            step = [0]

            def scraped_twice():
                step[0] += 1
                advance(step[0])
                return len(query(prom, "shardkv_txn_total[15s]")) and \
                    min(len(s["values"]) for s in query(prom, "shardkv_txn_total[15s]")) >= 3
            wait_for(scraped_twice, 30, "three scrapes", interval=0.5)

            empty = [(title, expr) for shard in (".*", "1") for title, expr in dashboard_queries("15s", shard)
                     if not query(prom, expr)]
            assert not empty, empty
            up = query(prom, 'shardkv_shard_up{shard="1"}')
            assert up[0]["value"][1] == "1"
    finally:
        server.shutdown()
