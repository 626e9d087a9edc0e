"""A real node (scripts/node, 2 shards) started on a data dir damaged while it was down:
it refuses at once, exit status 1, with a message naming the shard and the file and no
restart loop, or it recovers what a crash normally leaves (a log cut short). The data dir
is written by a node that was then SIGKILLed whole, so the shards' logs hold
acknowledged commits; a checkpoint taken half-way restores the refused one, as the
message says."""
import os
import shutil
import signal
import time

import pytest

from supervisor_harness import NodeProcess, free_port, request, write_config

pytestmark = pytest.mark.e2e

TXNS = 200


def start(tmp_path, data_dir, name: str) -> tuple[NodeProcess, str]:
    listen = f"tcp://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "node.toml",
                          router={"ping_interval_secs": 0.1, "shard_timeout_secs": 1.0},
                          supervisor={"stats_interval_secs": 0.2, "restart_backoff_initial_secs": 0.1})
    node = NodeProcess(tmp_path, "--config", str(config), "--data-dir", str(data_dir), "--shards", "2",
                       "--listen", listen, "--metrics-port", "0", name=name)
    return node, listen


@pytest.fixture(scope="module")
def crashed_data_dir(tmp_path_factory):
    """A data dir whose node was SIGKILLed after TXNS acknowledged txns (never flushed)."""
    tmp_path = tmp_path_factory.mktemp("crashed")
    node, listen = start(tmp_path, tmp_path / "data", "writer")
    try:
        node.wait_ready()
        for i in range(TXNS):
            reply = request(listen, {"op": "txn", "writes": [[b"k%03d" % i, b"v" * 3000]]})
            assert reply["ok"], reply
            if i == TXNS // 2:
                assert request(listen, {"op": "checkpoint", "action": "create", "name": "half"})["ok"]
    finally:
        node.kill_tree()
        node.kill_all()
    return tmp_path / "data"


def damaged(crashed_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(crashed_data_dir, data)
    shard = data / "shard-1"
    log = max((p for p in shard.glob("*.log") if p.stat().st_size), key=lambda p: int(p.stem))
    return data, log


def test_a_shard_log_damaged_before_its_end_stops_the_node_naming_it(crashed_data_dir, tmp_path):
    data, log = damaged(crashed_data_dir, tmp_path)
    assert log.stat().st_size > 3 * 32768       # RocksDB resynchronises at 32 KiB blocks:
    with open(log, "r+b") as f:                 # damage in the first, intact ones after it
        f.seek(1000)
        f.write(b"\xff" * 16)
    node, _ = start(tmp_path, data, "refused")
    try:
        t0 = time.monotonic()
        assert node.wait_exit(30) == 1
        assert time.monotonic() - t0 < 20
        text = node.log()
        assert "halting: shard 1 cannot start" in text and "damaged before its end" in text
        assert str(log) in text or (str(log.parent) in text and log.name in text)
        assert "restarting shard 1" not in text and "ready" not in " ".join(node.stdout_lines)
    finally:
        node.kill_all()
    # what the message says to do: restore a checkpoint
    restore = NodeProcess(tmp_path, "restore", "half", "--data-dir", str(data), name="restore")
    assert restore.wait_exit(60) == 0, restore.log()[-2000:]
    node, listen = start(tmp_path, data, "restored")
    try:
        node.wait_ready()
        reply = request(listen, {"op": "get", "keys": [b"k%03d" % i for i in range(TXNS)]})
        assert [v is not None for v in reply["values"]] == [i <= TXNS // 2 for i in range(TXNS)]
    finally:
        node.kill_all()


def test_a_shard_log_cut_short_by_a_crash_recovers(crashed_data_dir, tmp_path):
    data, log = damaged(crashed_data_dir, tmp_path)
    os.truncate(log, log.stat().st_size - 7)          # the last write, torn
    node, listen = start(tmp_path, data, "recovered")
    try:
        node.wait_ready()
        reply = request(listen, {"op": "get", "keys": [b"k%03d" % i for i in range(TXNS)]})
        missing = [i for i, v in enumerate(reply["values"]) if v is None]
        assert len(missing) <= 1 and all(i == max(missing) for i in missing)
        node.signal(signal.SIGTERM)
        assert node.wait_exit() == 0
    finally:
        node.kill_all()


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "timestamp").write_text("12x\n"), "timestamp is damaged"),
    (lambda d: (d / "NODE.json").write_text('{"shards": 2, "crea'), '{"shards": 2}'),
], ids=["timestamp", "NODE.json"])
def test_a_damaged_node_file_stops_the_start_at_once_naming_it(crashed_data_dir, tmp_path, damage, expected):
    data, _ = damaged(crashed_data_dir, tmp_path)
    damage(data)
    node, _ = start(tmp_path, data, "refused")
    try:
        assert node.wait_exit(20) == 1
        assert expected in node.log()
    finally:
        node.kill_all()
