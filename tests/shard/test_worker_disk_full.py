"""A shard worker on a full disk, in this process, its RocksDB on a real tmpfs (skipped
where mounting one is not permitted) that a filler file fills: nothing whose log write
failed is acknowledged; below `min_free_bytes` writes are refused and reads served; a
database the disk is too full to open for writing opens read-only and reopens for
writing once there is room. tests/supervisor/test_disk_full.py does it with real node
processes."""
import gc
import time

import pytest

from shard import messages as m
from shard import worker as worker_module
from shard.engine import ShardEngine
from shard.config import EngineConfig
from shard.storage import StorageWriteError
from tests.shard.stand_in_peer import Peer, answer
from tests.tmpfs import fill

BIG = b"v" * (256 << 10)     # a log record that needs fresh pages of the tmpfs


def config(min_free: int) -> dict:
    return {"flush": {"flush_on_start": False}, "prune": {"auto_interval_secs": 0},
            "node": {"busy_poll_us": 0}, "durability": {"min_free_bytes": min_free},
            "rocksdb": {"write_buffer_bytes": 1 << 20, "block_cache_bytes": 1 << 20}}


def send(w, peer, msg, rid, inc=True):
    msg["rid"] = rid
    if inc:
        msg.setdefault("inc", w.inc)
    w.handle_frame(peer, m.pack(msg), time.monotonic())


def abandon(w) -> None:
    """Release a worker whose storage failed as its process's end would (the fixture's
    shutdown is for healthy ones)."""
    w.shutdown = lambda: 0
    try:
        w.engine.storage.close()        # reports the failure again, and lets go of the files
    except StorageWriteError:
        pass
    w.listener.close()
    w.status.close()
    gc.collect()


def commit_item(ts, key, value=b"v"):
    return {"op": m.TXNS, "items": [[m.ITEM_COMMIT, ts, [], [[key, value]]]]}


def test_a_commit_whose_log_write_failed_is_never_acknowledged(tmpfs, booted_worker, monkeypatch):
    """The commit and a checkpoint come in one frame; the checkpoint's sync writes the
    commit's log record, which fails for want of space. That failure used to be answered
    `internal` for the checkpoint alone, the pass's sync then found nothing left to write
    (the failed batch had taken its records) and the commit was answered ok: acknowledged,
    and gone after a restart."""
    disk = tmpfs(8)
    w = booted_worker(config(0), data_dir=disk / "data")     # no guard: the write happens
    peer = Peer()
    send(w, peer, commit_item(1, b"before"), rid=1)
    w.finish_pass()
    assert answer(peer, 1)["results"] == [None]
    fill(disk / "filler")
    send(w, peer, {"op": m.MULTI, "msgs": [
        {**commit_item(2, b"lost", BIG), "rid": 2},
        {"op": m.CHECKPOINT, "dir": str(disk / "ckpt"), "ts": 2, "rid": 3},
        {"op": m.READ, "keys": [b"lost"], "at": 2, "rid": 4}]}, rid=None)
    with pytest.raises(StorageWriteError) as failed:
        w.finish_pass()                       # the sync fails again: nothing goes out
    w.shutdown = lambda: 0
    assert [r["rid"] for r in peer.replies] == [1]
    # storage_failed answers the pass unavailable (not lost: no space means the record
    # never reached the log, so the txn is `aborted`), then ends the process
    monkeypatch.setattr(worker_module, "hard_exit", lambda status: (_ for _ in ()).throw(SystemExit(status)))
    with pytest.raises(SystemExit) as exited:
        w.storage_failed(failed.value)
    assert exited.value.code == worker_module.EXIT_STORAGE
    for rid in (2, 3, 4):
        error = answer(peer, rid)["error"]
        assert error["code"] == "unavailable" and error["retryable"] and not error.get("lost")
        assert "No space left on device" in error["message"]
    # what a restart finds: the first commit, not the unacknowledged one
    abandon(w)
    (disk / "filler").unlink()
    engine = ShardEngine.open(w.path, 0, 1, EngineConfig(flush_on_start=False))
    try:
        assert engine.read([b"before", b"lost"], 10) == [(b"v", 1), (None, 0)]
    finally:
        engine.close()


def test_below_min_free_writes_are_refused_reads_served_and_resumed(tmpfs, booted_worker):
    disk = tmpfs(16)
    w = booted_worker(config(4 << 20), data_dir=disk / "data")
    peer = Peer()
    send(w, peer, commit_item(1, b"k"), rid=1)
    send(w, peer, {"op": m.TXNS, "items": [[m.ITEM_PREPARE, 2, [], [[b"p", b"x"]], [0, 1]]]}, rid=2)
    w.finish_pass()
    assert answer(peer, 2)["results"] == [None]
    fill(disk / "filler", leave=2 << 20)
    w.check_disk()
    assert w.snapshot()["disk"]["writes"] == "low_space"
    send(w, peer, {"op": m.TXNS, "items": [[m.ITEM_COMMIT, 3, [], [[b"k", b"w"]]],
                                           [m.ITEM_COMMIT, 4, [[b"k", 1]], []],
                                           [m.ITEM_PREPARE, 5, [], [[b"q", b"x"]], [0, 1]],
                                           [m.ITEM_COMMIT_PREPARED, 2, 6]]}, rid=3)
    send(w, peer, {"op": m.READ, "keys": [b"k", b"p"], "at": 6}, rid=4)
    send(w, peer, {"op": m.BLOCK, "height": 1}, rid=5)
    send(w, peer, {"op": m.FLUSH, "ts": 6}, rid=6)
    send(w, peer, {"op": m.PRUNE, "keep_versions": 1}, rid=7)
    send(w, peer, {"op": m.CHECKPOINT, "dir": str(disk / "ckpt"), "ts": 6}, rid=8)
    w.finish_pass()
    results = answer(peer, 3)["results"]
    assert results[1] is None and results[3] is None   # a validation; the 2PC txn finishes
    for refused in (results[0], results[2], *(answer(peer, rid)["error"] for rid in (5, 6, 7, 8))):
        assert refused["code"] == "unavailable" and refused["retryable"]
        assert "disk nearly full" in refused["message"] and "min_free_bytes" in refused["message"]
    assert answer(peer, 4)["values"] == [b"v", b"x"]
    assert not (disk / "ckpt").exists()
    (disk / "filler").unlink()
    w.check_disk()
    send(w, peer, commit_item(7, b"k", b"w"), rid=9)
    send(w, peer, {"op": m.BLOCK, "height": 1}, rid=10)
    w.finish_pass()
    assert answer(peer, 9)["results"] == [None] and answer(peer, 10)["ok"]
    assert w.snapshot()["disk"]["writes"] == "ok"


def test_a_disk_too_full_to_open_for_writing_opens_read_only(tmpfs, booted_worker):
    disk = tmpfs(16)
    w = booted_worker(config(0), data_dir=disk / "data")
    peer = Peer()
    send(w, peer, commit_item(1, b"k"), rid=1)
    send(w, peer, {"op": m.TXNS, "items": [[m.ITEM_PREPARE, 2, [], [[b"p", b"x"]], [0, 1]]]}, rid=2)
    w.finish_pass()
    w.shutdown()                              # the process stops
    w.shutdown = lambda: 0
    fill(disk / "filler")
    w = booted_worker(config(0), data_dir=disk / "data")
    snapshot = w.snapshot()
    assert snapshot["disk"]["writes"] == "read_only" and snapshot["disk"]["read_only"] == 1
    assert "read-only" in snapshot["disk"]["refused"] and "No space left" in snapshot["disk"]["refused"]
    peer = Peer()
    send(w, peer, {"op": m.READ, "keys": [b"k"], "at": 1}, rid=1)
    send(w, peer, commit_item(3, b"k", b"w"), rid=2)
    send(w, peer, {"op": m.COMMIT_PREPARED, "txn": 2, "ts": 3}, rid=3)
    send(w, peer, {"op": m.ABORT_PREPARED, "txn": 99}, rid=4)     # not here: nothing to write
    send(w, peer, {"op": m.RECOVER_INFO}, rid=5)
    w.finish_pass()
    assert answer(peer, 1)["values"] == [b"v"]
    assert answer(peer, 2)["results"][0]["code"] == "unavailable"
    error = answer(peer, 3)["error"]
    assert error["code"] == "unavailable" and error["read_only"] is True
    assert answer(peer, 4)["ok"] and [p["txn"] for p in answer(peer, 5)["prepared"]] == [2]
    (disk / "filler").unlink()
    w.run_timers(time.monotonic() + 60)       # the reopen is due
    assert w.snapshot()["disk"]["writes"] == "ok"
    send(w, peer, {"op": m.COMMIT_PREPARED, "txn": 2, "ts": 3}, rid=6)
    send(w, peer, commit_item(4, b"k", b"w"), rid=7)
    send(w, peer, {"op": m.READ, "keys": [b"k", b"p"], "at": 4}, rid=8)
    w.finish_pass()
    assert answer(peer, 6)["ok"] and answer(peer, 7)["results"] == [None]
    assert answer(peer, 8)["values"] == [b"w", b"x"]
