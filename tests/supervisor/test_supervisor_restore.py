"""Offline restore on real RocksDB directories: all shards or none, refusals, crash recovery.

The databases here are plain RocksDB (not engine shards), so staging is checked with
`restore.open_read_only`; the restore of real engine shards through `scripts/node restore`,
with the engine's own check, is in test_supervisor_node.py."""
import json
import os
import signal
import subprocess

import pytest
from rocksdict import AccessType, Rdict

from supervisor import restore
from supervisor.datadir import DataDirLock, write_json_atomic
from supervisor.restore import RestoreError
from supervisor_harness import ROOT, NodeProcess, fake_env, free_port

SHARDS = 2


def restore_(data_dir, name):
    return restore.restore(data_dir, name, verify=restore.open_read_only)


def put_db(path, value: bytes):
    db = Rdict(str(path))
    db[b"v"] = value
    db.close()


def get_db(path) -> bytes:
    db = Rdict(str(path), access_type=AccessType.read_only())
    try:
        return db[b"v"]
    finally:
        db.close()


def make_checkpoint(data, name, shards=SHARDS, tag=b"cp"):
    root = data / "checkpoints" / name
    for i in range(shards):
        put_db(root / f"shard-{i}", tag + b"-%d" % i)
    write_json_atomic(str(root / "MANIFEST.json"),
                      {"name": name, "ts": 42, "block": 3, "created_at": 0, "shards": shards})


@pytest.fixture
def data(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "NODE.json").write_text(json.dumps({"shards": SHARDS}))
    (data / "timestamp").write_text("100000")
    for i in range(SHARDS):
        put_db(data / f"shard-{i}", b"live-%d" % i)
    make_checkpoint(data, "cp1")
    return data


def live(data):
    return [get_db(data / f"shard-{i}") for i in range(SHARDS)]


def no_leftovers(data):
    return not any((data / n).exists() for n in (restore.STAGING, restore.OLD, restore.JOURNAL))


def test_restore_replaces_every_shard_and_keeps_the_checkpoint(data):
    manifest = restore_(str(data), "cp1")
    assert manifest["ts"] == 42
    assert live(data) == [b"cp-0", b"cp-1"]
    assert no_leftovers(data)
    assert (data / "timestamp").read_text() == "100000"     # ts never goes back
    assert get_db(data / "checkpoints" / "cp1" / "shard-0") == b"cp-0"
    put_db(data / "shard-0", b"written-after")              # the restored copy is independent
    assert get_db(data / "checkpoints" / "cp1" / "shard-0") == b"cp-0"


def test_unknown_name_is_refused_listing_the_available_ones(data):
    make_checkpoint(data, "cp2")
    with pytest.raises(RestoreError, match="no checkpoint named 'nope' .* available: cp1, cp2"):
        restore_(str(data), "nope")
    assert live(data) == [b"live-0", b"live-1"]


@pytest.mark.parametrize("name", ["../cp1", "checkpoints/cp1", "/tmp", ".hidden", "", "..", "a\0b"])
def test_path_like_names_are_refused(data, name):
    with pytest.raises(RestoreError, match="invalid checkpoint name"):
        restore_(str(data), name)


def test_checkpoint_of_another_shard_count_is_refused(data):
    make_checkpoint(data, "three", shards=3)
    with pytest.raises(RestoreError, match="checkpoint 'three' has 3 shards but data dir .* has 2"):
        restore_(str(data), "three")
    assert live(data) == [b"live-0", b"live-1"] and no_leftovers(data)


def test_refused_while_the_data_dir_is_locked(data):
    lock = DataDirLock(str(data)).acquire("test")
    try:
        with pytest.raises(Exception, match=f"in use by a running shardkv node \\(pid {os.getpid()}\\)"):
            restore_(str(data), "cp1")
    finally:
        lock.release()
    assert live(data) == [b"live-0", b"live-1"]


def test_a_broken_shard_in_the_checkpoint_changes_nothing(data):
    make_checkpoint(data, "broken")
    shard1 = data / "checkpoints" / "broken" / "shard-1"
    (shard1 / "CURRENT").unlink()
    with pytest.raises(RestoreError, match="shard-1 of the checkpoint does not open"):
        restore_(str(data), "broken")
    assert live(data) == [b"live-0", b"live-1"] and no_leftovers(data)


def test_a_missing_shard_in_the_checkpoint_changes_nothing(data):
    make_checkpoint(data, "partial")
    os.rename(data / "checkpoints" / "partial" / "shard-1", data / "elsewhere")
    with pytest.raises(RestoreError, match="incomplete: shard-1 is missing"):
        restore_(str(data), "partial")
    assert live(data) == [b"live-0", b"live-1"] and no_leftovers(data)


def test_crash_before_the_journal_rolls_back(data):
    restore.stage_all(str(data), "cp1", SHARDS, restore.open_read_only)          # staged, journal never written
    restore.finish_interrupted(str(data))
    assert live(data) == [b"live-0", b"live-1"] and no_leftovers(data)


@pytest.mark.parametrize("swapped", [0, 1, 2])
def test_crash_after_the_journal_rolls_forward(data, swapped):
    restore.stage_all(str(data), "cp1", SHARDS, restore.open_read_only)
    write_json_atomic(str(data / restore.JOURNAL), {"name": "cp1", "shards": SHARDS})
    (data / restore.OLD).mkdir()
    for i in range(swapped):                              # crash after `swapped` full swaps
        os.rename(data / f"shard-{i}", data / restore.OLD / f"shard-{i}")
        os.rename(data / restore.STAGING / f"shard-{i}", data / f"shard-{i}")
    if swapped < SHARDS:                                  # ...and half of the next one
        os.rename(data / f"shard-{swapped}", data / restore.OLD / f"shard-{swapped}")
    restore.finish_interrupted(str(data))
    assert live(data) == [b"cp-0", b"cp-1"] and no_leftovers(data)


def test_scripts_node_restore_refuses_bad_names_and_unknown_checkpoints(data):
    node = [str(ROOT / "scripts" / "node"), "restore"]
    bad = subprocess.run(node + ["../cp1", "--data-dir", str(data)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "restore refused: invalid checkpoint name" in bad.stderr
    unknown = subprocess.run(node + ["cp9", "--data-dir", str(data)], capture_output=True,
                             text=True, timeout=60)
    assert unknown.returncode == 1 and "available: cp1" in unknown.stderr
    assert live(data) == [b"live-0", b"live-1"]


def test_restore_is_refused_while_the_node_runs_and_node_start_finishes_a_restore(data, tmp_path):
    args = ["--data-dir", str(data), "--shards", str(SHARDS), "--metrics-port", "0",
            "--listen", f"tcp://127.0.0.1:{free_port()}"]
    node = NodeProcess(tmp_path, *args, env=fake_env())
    try:
        node.wait_ready()
        busy = subprocess.run([str(ROOT / "scripts" / "node"), "restore", "cp1", "--data-dir",
                               str(data)], capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1
        assert f"in use by a running shardkv node (pid {node.pid})" in busy.stderr
        node.signal(signal.SIGTERM)
        assert node.wait_exit() == 0
    finally:
        node.kill_all()
    assert live(data) == [b"live-0", b"live-1"]

    restore.stage_all(str(data), "cp1", SHARDS, restore.open_read_only)           # a restore that crashed mid-swap
    write_json_atomic(str(data / restore.JOURNAL), {"name": "cp1", "shards": SHARDS})
    node = NodeProcess(tmp_path, *args, env=fake_env())
    try:
        node.wait_ready()
        assert "completing an interrupted restore" in node.log()
    finally:
        node.kill_all()
    assert live(data) == [b"cp-0", b"cp-1"] and no_leftovers(data)


def test_a_staged_shard_is_on_disk_before_the_swap(tmp_path, monkeypatch):
    """Every file the copy wrote and the staged shard dir's own entries are fsynced (only
    the staging root was, so a power cut after the swap could lose files of a shard)."""
    src = tmp_path / "ckpt-shard"
    (src / "sub").mkdir(parents=True)
    for name in ("000007.sst", "MANIFEST-000005", "OPTIONS-000009", "sub/extra"):
        (src / name).write_bytes(b"x" * 10)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    dst = tmp_path / "staged"
    restore.copy_shard(str(src), str(dst))
    copied = {str(dst / n) for n in ("MANIFEST-000005", "OPTIONS-000009", "sub/extra")}
    assert copied <= set(synced)
    assert {str(dst), str(dst / "sub")} <= set(synced)
    assert os.stat(dst / "000007.sst").st_ino == os.stat(src / "000007.sst").st_ino   # linked
