"""The aggregated metrics: every PROTOCOL.md series, counter carry-over across shard
restarts, scrapes that survive dead pids and bad snapshots, /healthz, a real HTTP scrape."""
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.prom import wait_for
from tests.observability.snapshots import BOUNDS, full_state, router_snapshot, sample, scrape, shard_snapshot
from supervisor.http import start_metrics_server
from supervisor.metrics import MetricsState, make_registry

# PROTOCOL.md "Metrics": name -> (type, label names). The contract with operators.
PROTOCOL_SERIES = {
    "shardkv_txn": ("counter", {"shard", "result"}),
    "shardkv_txn_duration_seconds": ("histogram", {"shard"}),
    "shardkv_request_duration_seconds": ("histogram", {"op"}),
    "shardkv_keys": ("gauge", {"shard"}),
    "shardkv_versions": ("gauge", {"shard"}),
    "shardkv_flush": ("counter", {"shard"}),
    "shardkv_flush_keys": ("counter", {"shard"}),
    "shardkv_flush_bytes": ("counter", {"shard"}),
    "shardkv_last_flush_timestamp_seconds": ("gauge", {"shard"}),
    "shardkv_last_flush_block": ("gauge", {"shard"}),
    "shardkv_pruned_versions": ("counter", {"shard"}),
    "shardkv_block_height": ("gauge", set()),
    "shardkv_commit_ts": ("gauge", set()),
    "shardkv_shard_up": ("gauge", {"shard"}),
    "shardkv_shard_restarts": ("counter", {"shard"}),
    "shardkv_process_resident_memory_bytes": ("gauge", {"component", "shard"}),
    "shardkv_process_cpu_seconds": ("counter", {"component", "shard"}),
    "shardkv_rocksdb_live_sst_bytes": ("gauge", {"shard"}),
    "shardkv_rocksdb_estimated_keys": ("gauge", {"shard"}),
}

def test_every_protocol_series_exists_with_its_type_and_labels():
    families = scrape(full_state())
    for name, (kind, labels) in PROTOCOL_SERIES.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, (name, family.type)
        assert family.samples, f"{name} has no samples"
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    # per-shard series use the stable shard id, never a pid
    assert {s.labels["shard"] for s in families["shardkv_keys"].samples} == {"0", "1"}
    components = {(s.labels["component"], s.labels["shard"])
                  for s in families["shardkv_process_resident_memory_bytes"].samples}
    assert components == {("supervisor", ""), ("router", ""), ("shard", "0"), ("shard", "1")}


def test_values_come_from_the_snapshots():
    f = scrape(full_state())
    assert sample(f, "shardkv_txn", "shardkv_txn_total", shard="0", result="conflict") == 3
    assert sample(f, "shardkv_flush_bytes", "shardkv_flush_bytes_total", shard="1") == 4000
    assert sample(f, "shardkv_last_flush_timestamp_seconds", shard="0") == 1700000000.0
    assert sample(f, "shardkv_commit_ts") == 120
    assert sample(f, "shardkv_memory_budget_versions") == 2_000_000
    assert sample(f, "shardkv_requests", "shardkv_requests_total", op="txn", result="conflict") == 1
    assert sample(f, "shardkv_shard_up", shard="1") == 1
    assert sample(f, "shardkv_rocksdb_block_cache_bytes", shard="0") == 4096


def test_histogram_buckets_are_cumulative_and_resolve_50us_to_10s():
    state = full_state(shards=1)
    counts = [0] * (len(BOUNDS) + 1)
    counts[0], counts[4], counts[-2], counts[-1] = 2, 3, 1, 1     # 50us, 1ms, 10s, overflow
    state.update("shard", 0, shard_snapshot(0, counts=counts))
    f = scrape(state)
    bucket = lambda le: sample(f, "shardkv_txn_duration_seconds", "shardkv_txn_duration_seconds_bucket",
                               shard="0", le=le)
    assert bucket("5e-05") == 2
    assert bucket("0.001") == 5
    assert bucket("10.0") == 6
    assert bucket("+Inf") == 7
    assert sample(f, "shardkv_txn_duration_seconds", "shardkv_txn_duration_seconds_count", shard="0") == 7


def test_counters_carry_over_a_new_incarnation():
    state = full_state(shards=1)
    one = [1] + [0] * len(BOUNDS)
    state.update("shard", 0, shard_snapshot(0, inc="inc-a", committed=10, counts=one, flushes=2))
    state.update("shard", 0, shard_snapshot(0, inc="inc-b", committed=3, counts=one, flushes=1))
    f = scrape(state)
    assert sample(f, "shardkv_txn", "shardkv_txn_total", shard="0", result="committed") == 13
    assert sample(f, "shardkv_flush", "shardkv_flush_total", shard="0") == 3
    name = "shardkv_txn_duration_seconds"
    assert sample(f, name, name + "_bucket", shard="0", le="5e-05") == 2
    assert sample(f, name, name + "_count", shard="0") == 2
    assert sample(f, name, name + "_sum", shard="0") == pytest.approx(0.02)
    # later snapshots of the same incarnation replace, not add
    state.update("shard", 0, shard_snapshot(0, inc="inc-b", committed=5, counts=one, flushes=1))
    f = scrape(state)
    assert sample(f, "shardkv_txn", "shardkv_txn_total", shard="0", result="committed") == 15
    # gauges are the current incarnation's, not summed
    assert sample(f, "shardkv_keys", shard="0") == 100
    # a late snapshot of the dead incarnation changes nothing
    state.update("shard", 0, shard_snapshot(0, inc="inc-a", committed=10, counts=one, flushes=2))
    f = scrape(state)
    assert sample(f, "shardkv_txn", "shardkv_txn_total", shard="0", result="committed") == 15


def test_router_counters_carry_over_a_router_restart():
    state = full_state(shards=1)
    state.update("router", None, router_snapshot(inc="r-2", gets=1))
    f = scrape(state)
    assert sample(f, "shardkv_requests", "shardkv_requests_total", op="get", result="ok") == 5
    name = "shardkv_request_duration_seconds"
    assert sample(f, name, name + "_count", op="get") == 5


def test_node_txn_total_counts_the_routers_outcomes_and_carries_over_a_router_restart():
    """The dashboard's TPS and success rate summed the shards' shardkv_txn_total, which
    counts a cross-shard txn once per participant and a read-only one only when it fails
    (an audit): the router's per-transaction outcomes are exported as a node counter."""
    state = full_state(shards=2)        # router r-1: committed 7, conflict 2
    f = scrape(state)
    assert f["shardkv_node_txn"].type == "counter"
    assert {s.labels["result"]: s.value for s in f["shardkv_node_txn"].samples
            if s.name == "shardkv_node_txn_total"} == {"committed": 7, "conflict": 2, "error": 0}
    state.update("router", None, dict(router_snapshot(inc="r-2"), txn={"committed": 3, "error": 1}))
    f = scrape(state)
    for result, n in (("committed", 10), ("conflict", 2), ("error", 1)):
        assert sample(f, "shardkv_node_txn", "shardkv_node_txn_total", result=result) == n


def test_the_router_snapshot_carries_its_transaction_outcomes(tmp_path):
    from node.router import Router
    spec = {"config": {}, "shards": 1, "data_dir": str(tmp_path), "run_dir": str(tmp_path)}
    router = Router(spec)
    conflict = {"ok": False, "error": {"code": "conflict"}}
    router.count_txn({"ok": True, "commit_ts": 5})
    router.count_txns([{"ok": True, "commit_ts": 6}, conflict, {"ok": False, "error": {"code": "unavailable"}}])
    router.count_txn(conflict)
    assert router.snapshot()["txn"] == {"committed": 2, "conflict": 2, "error": 1}


def test_the_memory_budget_in_bytes_is_the_machines_ram_and_says_so():
    """Its HELP said "configured, else the machine's RAM", but no config key sets it."""
    import psutil
    family = scrape(full_state())["shardkv_memory_budget_bytes"]
    assert "machine's total RAM" in family.documentation
    assert "configured" not in family.documentation
    assert sample({"b": family}, "b", "shardkv_memory_budget_bytes") == psutil.virtual_memory().total


def test_a_dead_pid_and_a_down_shard_do_not_break_the_scrape():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = full_state()
    state.set_child("shard", 1, dead.pid, False, 2)
    f = scrape(state)
    assert sample(f, "shardkv_shard_up", shard="1") == 0
    assert sample(f, "shardkv_shard_restarts", "shardkv_shard_restarts_total", shard="1") == 2
    # the last snapshot is still served
    assert sample(f, "shardkv_keys", shard="1") == 100
    rss = {s.labels["shard"] for s in f["shardkv_process_resident_memory_bytes"].samples
           if s.labels["component"] == "shard"}
    assert rss == {"0"}
    # even when the supervisor still believes the dead pid is up
    state.set_child("shard", 1, dead.pid, True, 2)
    assert sample(scrape(state), "shardkv_shard_up", shard="1") == 1


def test_cpu_seconds_do_not_go_back_when_a_shard_gets_a_new_pid():
    state = full_state(shards=1)
    registry = make_registry(state)

    def cpu():
        text = generate_latest(registry).decode()
        f = {m.name: m for m in text_string_to_metric_families(text)}
        return sample(f, "shardkv_process_cpu_seconds", "shardkv_process_cpu_seconds_total",
                      component="shard", shard="0")
    before = cpu()                       # this test process: well above zero
    assert before > 0
    fresh = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        state.set_child("shard", 0, fresh.pid, True, 1)
        assert cpu() >= before
    finally:
        fresh.kill()
        fresh.wait()


def test_bad_snapshots_are_skipped_without_breaking_the_scrape():
    state = full_state(shards=2)
    state.update("shard", 0, {"role": "shard", "inc": "x", "keys": "many", "txn": {"committed": None},
                              "commit_latency": {"bounds": "nope", "counts": [1, "a"], "sum": "s"},
                              "flush": [], "rocksdb": {"live_sst_bytes": float("nan")}})
    state.update("shard", 1, "not a dict")
    state.update("shard", -3, shard_snapshot(0))
    state.update("router", None, {"requests": {"get": 5}, "requests_total": {"get": 7}, "shards_up": []})
    state.update("bogus", 0, shard_snapshot(0))
    f = scrape(state)
    assert not [s for s in f["shardkv_keys"].samples if s.labels["shard"] == "0"]
    assert sample(f, "shardkv_keys", shard="1") == 100
    assert sample(f, "shardkv_shard_up", shard="0") == 1


def test_a_configured_shard_that_never_reported_is_down():
    state = MetricsState(shard_count=3)
    state.set_child("router", None, os.getpid(), True, 0)
    state.set_child("shard", 0, os.getpid(), True, 0)
    assert state.down_parts() == ["shard 1", "shard 2"]
    assert not state.healthy()
    f = scrape(state)
    assert sample(f, "shardkv_shard_up", shard="2") == 0


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type")


@pytest.fixture
def served():
    state = full_state()
    server = start_metrics_server("127.0.0.1", 0, state)
    yield state, f"http://127.0.0.1:{server.port}"
    server.shutdown()


def test_http_serves_metrics_and_healthz(served):
    state, base = served
    status, body, ctype = get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(body)}
    assert set(PROTOCOL_SERIES) <= families
    assert get(base + "/healthz")[:2] == (200, "ok\n")

    state.set_child("shard", 1, None, False, 1)
    status, body, _ = get(base + "/healthz")
    assert status == 503 and "shard 1" in body and "router" not in body
    state.set_child("router", None, None, False, 0)
    assert "router" in get(base + "/healthz")[1]
    # still scrapable while parts are down
    assert get(base + "/metrics")[0] == 200
    assert get(base + "/nope")[0] == 404


def test_metrics_are_served_on_an_ipv6_loopback_host_too():
    server = start_metrics_server("::1", 0, full_state())
    try:
        status, body, _ = get(f"http://[::1]:{server.port}/healthz")
        assert status == 200
    finally:
        server.shutdown()


def test_shutdown_releases_the_port():
    state = full_state()
    server = start_metrics_server("127.0.0.1", 0, state)
    port = server.port
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    server.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = start_metrics_server("127.0.0.1", port, state)   # rebinding works
    again.shutdown()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes; raises socket.timeout if it does not."""
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def test_a_stalled_client_is_closed_after_the_request_timeout():
    """An idle or half-sent connection held a thread and an fd of the supervisor forever;
    enough of them used up its fds, and the next child respawn failed (an audit)."""
    server = start_metrics_server("127.0.0.1", 0, full_state(), request_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as idle, \
                socket.create_connection(("127.0.0.1", server.port)) as half:
            half.sendall(b"GET /metr")
            assert read_until_closed(idle, timeout=10) == b""
            assert read_until_closed(half, timeout=10) == b""
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    finally:
        server.shutdown()


def test_a_request_line_without_a_version_is_answered_at_once(served):
    _, base = served     # the default timeout (10 s) is longer than the client waits
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /metrics\r\n")     # HTTP/0.9: no headers follow
        assert read_until_closed(sock, timeout=5).startswith(b"HTTP/1.0 400 ")


def test_connections_beyond_the_cap_are_closed_and_the_others_served():
    server = start_metrics_server("127.0.0.1", 0, full_state(), request_timeout=30,
                                  max_connections=2)
    address = ("127.0.0.1", server.port)
    try:
        first, second = socket.create_connection(address), socket.create_connection(address)
        with socket.create_connection(address) as third:   # accepted after the first two
            third.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert read_until_closed(third, timeout=10) == b""
        first.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert read_until_closed(first, timeout=10).startswith(b"HTTP/1.0 200 ")
        first.close()

        def served_again():   # the first one's slot is free once its thread ends
            with socket.create_connection(address) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                return read_until_closed(sock, timeout=10).startswith(b"HTTP/1.0 200 ")
        wait_for(served_again, 10, "a new connection to be served")
        second.close()
    finally:
        server.shutdown()


def test_without_inc_a_counter_going_down_marks_a_restart():
    state = full_state(shards=1)
    state.update("router", None, dict(router_snapshot(gets=4), inc=None))
    state.update("router", None, dict(router_snapshot(gets=6), inc=None))   # same process, more gets
    state.update("router", None, dict(router_snapshot(gets=2), inc=None))   # restarted: counts from 0
    f = scrape(state)
    # 4 (inc r-1) + 6 (first inc-less process) + 2
    assert sample(f, "shardkv_requests", "shardkv_requests_total", op="get", result="ok") == 12


def test_without_inc_a_new_pid_or_a_counter_gone_marks_a_restart():
    """A new router's first snapshot can hold no request counters at all: with no inc to
    tell, the old totals were dropped (20 -> missing -> 1 at /metrics, an audit saw)."""
    state = full_state(shards=1)
    state.update("router", None, dict(router_snapshot(gets=20), inc=None, pid=111))
    empty = dict(router_snapshot(gets=0), inc=None, pid=111, results=[], requests={})
    state.update("router", None, empty)                                       # same pid, counters gone
    state.update("router", None, dict(router_snapshot(gets=1), inc=None, pid=222))   # new pid
    f = scrape(state)
    # 4 (inc r-1) + 20 + 0 + 1: never below what was scraped before
    assert sample(f, "shardkv_requests", "shardkv_requests_total", op="get", result="ok") == 25


def test_the_router_snapshot_names_its_incarnation(tmp_path):
    from node.router import Router
    spec = {"config": {}, "shards": 1, "data_dir": str(tmp_path), "run_dir": str(tmp_path)}
    first, second = Router(spec), Router(spec)
    assert first.snapshot()["inc"] == first.inc and first.inc != second.inc


def test_requests_total_as_nested_map():
    state = full_state(shards=1)
    snap = router_snapshot()
    del snap["results"]
    snap["requests_total"] = {"get": {"ok": 4, "unavailable": 2}}
    state.update("router", None, snap)
    f = scrape(state)
    assert sample(f, "shardkv_requests", "shardkv_requests_total", op="get", result="unavailable") == 2
