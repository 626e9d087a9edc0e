"""Bridge to the metrics cache and HTTP server (supervisor/metrics.py, supervisor/http.py).

Those modules belong to the observability part; the supervisor only feeds a state
object with `update(role, shard, snapshot)` and `set_child(role, shard, pid, up, restarts)`
and starts the server if it exists. Until they land, a plain state object keeps the
latest values so the supervisor works the same either way.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("shardkv.supervisor")


class PlainMetricsState:
    """Fallback: the latest snapshot and process facts per child, nothing served."""

    def __init__(self):
        self.snapshots: dict[tuple, dict] = {}
        self.children: dict[tuple, dict] = {}

    def update(self, role, shard, snapshot) -> None:
        self.snapshots[(role, shard)] = snapshot

    def set_child(self, role, shard, pid, up, restarts) -> None:
        self.children[(role, shard)] = {"pid": pid, "up": up, "restarts": restarts}


def make_metrics_state(config: dict):
    try:
        from supervisor.metrics import MetricsState
    except ImportError:
        return PlainMetricsState()
    try:
        state = MetricsState(shard_count=config["node"]["shards"],
                             memory_budget_versions=config["memory"]["max_resident_versions"])
    except TypeError:
        state = MetricsState()
    if hasattr(state, "set_supervisor_pid"):
        state.set_supervisor_pid(os.getpid())
    return state


def start_metrics_server(config: dict, state):
    """Serve /metrics and /healthz; returns (url, server), or (None, None) when off."""
    host, port = config["node"]["metrics_host"], config["node"]["metrics_port"]
    if port == 0:
        return None, None
    try:
        from supervisor.http import start_metrics_server as start
    except ImportError:
        log.warning("metrics server not available in this build; /metrics is off")
        return None, None
    try:
        server = start(host, port, state)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port} (node.metrics_port): "
                      f"{exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}", server


def stop_metrics_server(server) -> None:
    if server is not None and hasattr(server, "shutdown"):
        server.shutdown()
