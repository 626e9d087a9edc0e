"""The supervisor as a real process tree, with stand-in children (tests/supervisor/fake_child.py)
that speak the status protocol: boot, ready line, restarts, halts, graceful stop, orphans."""
import json
import os
import signal
import socket
import stat

import psutil
import pytest

from supervisor_harness import (NodeProcess, alive, fake_env, free_port, http_get, metric,
                                request, wait_for, write_config)

pytestmark = pytest.mark.e2e


def start(tmp_path, *extra, env=None, shards=2, config=None, metrics_port=0):
    listen = f"tcp://127.0.0.1:{free_port()}"
    args = ["--data-dir", str(tmp_path / "data"), "--shards", str(shards), "--listen", listen,
            "--metrics-port", str(metrics_port)]
    if config is not None:
        args += ["--config", str(config)]
    node = NodeProcess(tmp_path, *args, *extra, env=env or fake_env())
    node.listen = listen
    return node


def fast_config(tmp_path, **supervisor):
    values = {"stats_interval_secs": 0.1, "heartbeat_timeout_secs": 1.0,
              "restart_backoff_initial_secs": 0.1, "shutdown_grace_secs": 2.0, **supervisor}
    return write_config(tmp_path / "fast.toml", supervisor=values)


def events(tmp_path):
    path = tmp_path / "events"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def nodes():
    started = []
    yield started
    for node in started:
        node.kill_all()


def test_ready_line_ping_and_graceful_stop_router_first(tmp_path, nodes):
    node = start(tmp_path, env=fake_env(FAKE_EVENTS=tmp_path / "events"))
    nodes.append(node)
    line = node.wait_ready()
    assert line == f"shardkv ready: 2 shards, listening on {node.listen}, metrics off"
    assert request(node.listen, {"op": "ping", "id": 7}) == \
        {"id": 7, "ok": True, "version": 1, "shards": 2, "ts": 0}
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert json.loads((data / "NODE.json").read_text())["shards"] == 2
    run_dir = node.log().split("run dir ")[1].split()[0]
    assert os.path.isdir(run_dir) and stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    children = [c.pid for c in node.children()]
    assert len(children) == 3

    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0
    assert node.stdout_lines == [line]          # exactly one line on stdout, the ready line
    stops = [(who, float(t)) for who, what, pid, t in events(tmp_path) if what == "stop"]
    assert {who for who, _ in stops} == {"router:", "shard:0", "shard:1"}
    router_stop = dict(stops)["router:"]
    assert all(t > router_stop for who, t in stops if who != "router:")   # router first
    assert not os.path.exists(run_dir)
    assert not any(alive(pid) for pid in children)


def test_ctrl_c_stops_with_status_0_and_still_router_first(tmp_path, nodes):
    node = start(tmp_path, env=fake_env(FAKE_EVENTS=tmp_path / "events"))
    nodes.append(node)
    node.wait_ready()
    os.killpg(node.pid, signal.SIGINT)          # what a terminal's Ctrl-C does
    assert node.wait_exit() == 0
    assert "SIGINT received" in node.log()
    stops = {who: float(t) for who, what, pid, t in events(tmp_path) if what == "stop"}
    assert stops["router:"] < min(stops["shard:0"], stops["shard:1"])


def test_another_shard_count_is_refused_before_any_child_starts(tmp_path, nodes):
    node = start(tmp_path, shards=2)
    nodes.append(node)
    node.wait_ready()
    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0

    again = start(tmp_path, shards=3, env=fake_env(FAKE_EVENTS=tmp_path / "events"))
    nodes.append(again)
    assert again.wait_exit() == 1
    assert "created with 2 shards; refusing to open it with --shards 3" in again.log()
    assert events(tmp_path) == []               # no child was started
    assert again.stdout_lines == []


def test_second_node_on_the_same_data_dir_is_refused(tmp_path, nodes):
    node = start(tmp_path)
    nodes.append(node)
    node.wait_ready()
    other = start(tmp_path)
    nodes.append(other)
    assert other.wait_exit() == 1
    assert f"in use by a running shardkv node (pid {node.pid})" in other.log()
    assert request(node.listen, {"op": "ping"})["ok"]   # the first one is untouched


def test_sigkilled_shard_is_restarted_and_counted(tmp_path, nodes):
    port = free_port()
    node = start(tmp_path, config=fast_config(tmp_path), metrics_port=port)
    nodes.append(node)
    assert node.wait_ready().endswith(f"metrics on http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    assert http_get(url + "/healthz")[0] == 200
    assert metric(http_get(url + "/metrics")[1], 'shardkv_shard_restarts_total{shard="1"}') == 0

    victim = node.child_pid('"shard": 1')
    os.kill(victim, signal.SIGKILL)
    log = node.wait_log("shard 1 ready", count=2)
    assert f"shard 1 (pid {victim}) was killed by SIGKILL" in log
    assert "restarting shard 1 in 0.1s (restart #1)" in log
    new = node.child_pid('"shard": 1')
    assert new != victim
    assert metric(http_get(url + "/metrics")[1], 'shardkv_shard_restarts_total{shard="1"}') == 1
    assert metric(http_get(url + "/metrics")[1], 'shardkv_shard_restarts_total{shard="0"}') == 0
    assert http_get(url + "/healthz")[0] == 200
    assert request(node.listen, {"op": "ping"})["ok"]
    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0
    assert len(node.stdout_lines) == 1          # a restart prints no second ready line


def test_metrics_port_in_use_is_a_clear_boot_failure(tmp_path, nodes):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        node = start(tmp_path, metrics_port=busy.getsockname()[1],
                     env=fake_env(FAKE_EVENTS=tmp_path / "events"))
        nodes.append(node)
        assert node.wait_exit() == 1
    assert "(node.metrics_port): Address already in use" in node.log()
    assert events(tmp_path) == []
    # Nothing ran, so the data dir is not tied to --shards 2 (NODE.json was written
    # before the port was bound, and this start was refused).
    again = start(tmp_path, shards=3)
    nodes.append(again)
    again.wait_ready()
    again.signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    assert json.loads((tmp_path / "data" / "NODE.json").read_text())["shards"] == 3


def test_restart_backoff_grows(tmp_path, nodes):
    node = start(tmp_path, config=fast_config(tmp_path))
    nodes.append(node)
    node.wait_ready()
    for n in (1, 2):
        pid = node.child_pid('"shard": 0')
        os.kill(pid, signal.SIGKILL)
        node.wait_log("shard 0 ready", count=n + 1)
    log = node.log()
    assert "restarting shard 0 in 0.1s (restart #1)" in log
    assert "restarting shard 0 in 0.2s (restart #2)" in log


def test_child_reporting_fatal_halts_with_its_message(tmp_path, nodes):
    node = start(tmp_path, env=fake_env(FAKE_FATAL="shard:1", FAKE_EVENTS=tmp_path / "events"))
    nodes.append(node)
    assert node.wait_exit() == 1
    log = node.log()
    assert "halting: shard 1 cannot start: fake boot failure: disk on fire" in log
    assert node.stdout_lines == []
    starts = [who for who, what, *_ in events(tmp_path) if what == "start"]
    assert starts.count("shard:1") == 1        # halted, not respawned
    assert node.children() == []


def test_child_dying_before_ready_halts(tmp_path, nodes):
    node = start(tmp_path, env=fake_env(FAKE_CRASH_EARLY="router:"))
    nodes.append(node)
    assert node.wait_exit() == 1
    assert "router exited with status 3 before it ever became ready" in node.log()


def test_hung_child_is_killed_and_restarted(tmp_path, nodes):
    node = start(tmp_path, config=fast_config(tmp_path), env=fake_env(FAKE_HANG="shard:0"))
    nodes.append(node)
    node.wait_ready()
    log = node.wait_log("shard 0 ready", count=2, timeout=15)
    assert "sent no status for" in log and "hung, killing it" in log
    assert "restarting shard 0" in log


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path, nodes):
    config = fast_config(tmp_path, shutdown_grace_secs=1.0)
    node = start(tmp_path, config=config, env=fake_env(FAKE_IGNORE_TERM="shard:0"))
    nodes.append(node)
    node.wait_ready()
    node.signal(signal.SIGTERM)
    # exit status 0 would say every shard flushed (PROTOCOL.md): this one was killed
    assert node.wait_exit(timeout=20) == 1
    log = node.log()
    assert "shard 0 (pid" in log and "did not stop within 1.0s: SIGKILL" in log


def test_a_shard_killed_while_the_node_stops_makes_the_exit_status_1(tmp_path, nodes):
    """Exit status 0 says every shard flushed (PROTOCOL.md). A shard SIGKILLed during the
    stop, before its grace ran out, did not: the status was 0 all the same."""
    config = fast_config(tmp_path, shutdown_grace_secs=30.0)
    node = start(tmp_path, config=config, env=fake_env(FAKE_IGNORE_TERM="shard:0"))
    nodes.append(node)
    node.wait_ready()
    shard0 = node.child_pid('"shard": 0')
    node.signal(signal.SIGTERM)
    node.wait_log(f"stopping shard 0 (pid {shard0})")
    os.kill(shard0, signal.SIGKILL)
    assert node.wait_exit(timeout=20) == 1


def test_a_respawn_that_cannot_open_files_is_retried_with_backoff(tmp_path, nodes):
    """Out of fds (an audit used them up with idle HTTP clients), the respawn of a killed
    shard failed with EMFILE and the supervisor took it for a failed boot: it exited and
    the whole node went down. It is a failed restart, tried again after the backoff."""
    node = start(tmp_path, config=fast_config(tmp_path))
    nodes.append(node)
    node.wait_ready()
    supervisor = psutil.Process(node.pid)
    limits = supervisor.rlimit(psutil.RLIMIT_NOFILE)
    supervisor.rlimit(psutil.RLIMIT_NOFILE, (3, limits[1]))     # no new fd at all
    os.kill(node.child_pid('"shard": 1'), signal.SIGKILL)
    log = node.wait_log("cannot restart shard 1: [Errno 24] Too many open files", count=2)
    assert "trying again in 0.2s" in log and "trying again in 0.4s" in log
    supervisor.rlimit(psutil.RLIMIT_NOFILE, limits)
    node.wait_log("shard 1 ready", count=2)
    assert request(node.listen, {"op": "ping"})["ok"]
    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0


def test_a_stop_while_a_shard_waits_to_be_restarted_makes_the_exit_status_1(tmp_path, nodes):
    """The stop cancels the pending restart, so that shard never flushed in it."""
    node = start(tmp_path, config=fast_config(tmp_path, restart_backoff_initial_secs=30.0,
                                              restart_backoff_max_secs=60.0))
    nodes.append(node)
    node.wait_ready()
    os.kill(node.child_pid('"shard": 1'), signal.SIGKILL)
    node.wait_log("restarting shard 1 in 30.0s")
    node.signal(signal.SIGTERM)
    assert node.wait_exit(timeout=20) == 1


def test_the_data_dir_stays_locked_until_the_last_process_of_a_killed_node_exits(tmp_path, nodes):
    """The supervisor's children hold the data dir lock too: after a SIGKILL of the
    supervisor alone, a restore (or a new node) went ahead while a shard was still
    shutting down on the same files (an audit saw one staging beside a live shard)."""
    from supervisor.datadir import DataDirError, DataDirLock
    node = start(tmp_path, env=fake_env(FAKE_IGNORE_TERM="shard:0", FAKE_SLOW_ORPHAN="shard:0"))
    nodes.append(node)
    node.wait_ready()
    shard0 = node.child_pid('"shard": 0')
    os.kill(node.pid, signal.SIGKILL)
    node.wait_exit()
    assert alive(shard0)                    # still stopping, as a shard flushing would be
    with pytest.raises(DataDirError, match=f"supervisor \\(pid {node.pid}\\) is gone"):
        DataDirLock(str(tmp_path / "data")).acquire("restoring", orphans_wait_secs=0.5)
    os.kill(shard0, signal.SIGKILL)
    wait_for(lambda: not alive(shard0), 10, "shard 0 to exit")
    DataDirLock(str(tmp_path / "data")).acquire("restoring", orphans_wait_secs=5).release()


def test_sigkill_of_the_supervisor_leaves_no_orphans(tmp_path, nodes):
    node = start(tmp_path)
    nodes.append(node)
    node.wait_ready()
    children = [c.pid for c in node.children()]
    assert len(children) == 3
    os.kill(node.pid, signal.SIGKILL)
    node.wait_exit()
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "children to exit")
