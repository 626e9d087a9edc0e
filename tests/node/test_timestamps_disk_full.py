"""The commit_ts reservation on a full disk (node/timestamps.py), its file on a real tmpfs
(skipped where mounting one is not permitted) that a filler fills: the oracle keeps
handing out what it reserved while the renewal fails, never a ts above what its file
holds, the router refuses the writes it cannot cover `unavailable` (reads need no ts),
and a damaged file is refused at start with its name."""
import pytest

from node import timestamps
from node.timestamps import TimestampOracle
from tests.tmpfs import fill


def test_a_full_disk_stops_new_timestamps_only_past_the_reservation(tmpfs, monkeypatch):
    monkeypatch.setattr(timestamps, "RETRY_EVERY", 10)
    disk = tmpfs(1)
    oracle = TimestampOracle(str(disk / "timestamp"), reserve=100)
    oracle.start(0)
    handed = [oracle.next() for _ in range(40)]
    fill(disk / "filler")
    handed += [oracle.next() for _ in range(60)]       # past the renewal point: tolerated
    assert oracle.failure and "No space left on device" in oracle.failure
    handed += [oracle.next() for _ in range(oracle.reserved_upto - oracle.last)]
    assert not oracle.room_for(1)
    with pytest.raises(OSError):
        oracle.next()
    assert handed == sorted(set(handed))               # strictly increasing
    assert int((disk / "timestamp").read_text()) >= handed[-1]   # never above the file
    (disk / "filler").unlink()
    assert oracle.room_for(1) and oracle.failure is None
    after = oracle.next()
    assert after > handed[-1]
    restarted = TimestampOracle(str(disk / "timestamp"), reserve=100)
    assert restarted.start(0) >= after                  # a restart never hands one out again


def test_the_router_refuses_writes_it_has_no_timestamps_for(inproc_router, tmpfs):
    disk = tmpfs(1)
    r = inproc_router
    r.oracle = TimestampOracle(str(disk / "timestamp"), reserve=10)
    r.oracle.start(0)
    fill(disk / "filler")
    while r.oracle.last < r.oracle.reserved_upto:    # what was reserved before it filled
        r.oracle.next()
    answers = []
    r.fail = lambda ctx, error: answers.append((ctx, error))
    assert r.refused_for_timestamps("txn", {"op": "txn", "writes": [[b"k", b"v"]]})
    assert r.refused_for_timestamps("flush", {"op": "flush"})
    assert not r.refused_for_timestamps("get", {"op": "get", "keys": [b"k"]})
    assert not r.refused_for_timestamps("read-only txn", {"op": "txn", "reads": [[b"k", 0]], "writes": []})
    (ctx, error), (_, flush_error) = answers
    assert error["code"] == "unavailable" and error["outcome"] == "aborted" and error["retryable"]
    assert "cannot reserve commit timestamps" in error["message"] and "outcome" not in flush_error
    (disk / "filler").unlink()
    assert not r.refused_for_timestamps("txn", {"op": "txn", "writes": [[b"k", b"v"]]})


@pytest.mark.parametrize("content", [b"12x\n", b"", b"\x00\x00\x00"])
def test_a_damaged_reservation_file_is_refused_by_name(tmp_path, content):
    (tmp_path / "timestamp").write_bytes(content)
    with pytest.raises(ValueError, match="timestamp is damaged"):
        TimestampOracle(str(tmp_path / "timestamp")).read_reserved()
