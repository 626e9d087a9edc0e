"""A shard database damaged on disk the ways it happens: a log cut short or ending in
zeros by a crash (recovered: its torn record was never acknowledged), a log damaged before
its end, a zero-filled SST block, a missing CURRENT or MANIFEST, damaged meta and
commit-log rows (refused or reported, naming the shard and file, never taken for less
data). Real RocksDB files, damaged with plain file writes; a crash is a child process
that ends with os._exit after its last acknowledged commit."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shard import commitlog as cl
from shard.config import EngineConfig
from shard.damage import ACCEPT_LOSS_ENV, DamagedDatabase
from shard.engine import ShardEngine
from shard.keycodec import be64
from shard.storage import open_db

ROOT = Path(__file__).resolve().parents[2]
N = 400
CONFIG = EngineConfig(flush_on_start=False)

CRASHED_SHARD = """
import os, sys
from shard.config import EngineConfig
from shard.engine import ShardEngine
e = ShardEngine.open(sys.argv[1], 0, 1, EngineConfig(flush_on_start=False,
                                                   rocksdb={{"compression": "none"}}))
for i in range(1, {n} + 1):
    e.commit(i, [], [(b"k%05d" % i, b"v" * 200)])
    e.sync()                                   # acknowledged: in the log
if sys.argv[2] == "flush":
    e.flush()
    e.close()
os._exit(0)                                    # a crash: nothing closed
"""


def make_shard(path: Path, flush: bool = False) -> Path:
    subprocess.run([sys.executable, "-c", CRASHED_SHARD.format(n=N), str(path),
                    "flush" if flush else "crash"], cwd=ROOT, check=True)
    return path


def last_log(path: Path) -> Path:
    logs = [p for p in path.glob("*.log") if p.stat().st_size]
    return max(logs, key=lambda p: int(p.stem))


def present(engine) -> list[int]:
    """The i of every key k<i> that reads back, in order; a damaged read raises."""
    return [i for i in range(1, N + 1) if engine.read([b"k%05d" % i], N)[0][0] is not None]


def test_a_log_cut_short_by_a_crash_recovers_every_whole_record(tmp_path):
    path = make_shard(tmp_path / "s")
    log = last_log(path)
    os.truncate(log, log.stat().st_size - 10)          # the last write, torn
    engine = ShardEngine.open(str(path), 0, 1, CONFIG)
    try:
        assert present(engine) == list(range(1, N))    # all but the torn one
        assert engine.storage.recovery_note is None
    finally:
        engine.close()


def test_a_log_ending_in_zeros_recovers_what_precedes_them_and_says_so(tmp_path):
    path = make_shard(tmp_path / "s")
    log = last_log(path)
    with open(log, "r+b") as f:                        # pages a machine crash never wrote
        f.seek(log.stat().st_size - 3000)
        f.write(b"\0" * 3000)
    engine = ShardEngine.open(str(path), 0, 1, CONFIG)
    try:
        kept = present(engine)
        assert kept == list(range(1, len(kept) + 1)) and N - 20 < len(kept) < N
        note = engine.storage.recovery_note
        assert log.name in note and "ended in a damaged record" in note
    finally:
        engine.close()


def test_a_log_damaged_before_its_end_is_refused_not_cut_silently(tmp_path, monkeypatch):
    """Point-in-time recovery, which every open used, stopped at the damage and dropped
    every acknowledged commit after it without a word (half of them here)."""
    path = make_shard(tmp_path / "s")
    log = last_log(path)
    assert log.stat().st_size > 3 * 32768       # RocksDB resynchronises at 32 KiB blocks:
    with open(log, "r+b") as f:                 # intact ones follow the damage
        f.seek(log.stat().st_size // 2)
        f.write(b"\xff" * 16)
    for _ in range(2):                                  # refused, and nothing was rewritten
        with pytest.raises(DamagedDatabase) as refused:
            ShardEngine.open(str(path), 0, 1, CONFIG)
        message = str(refused.value)
        assert str(path) in message and log.name in message
        assert "damaged before its end" in message and "restore" in message
    monkeypatch.setenv(ACCEPT_LOSS_ENV, "point_in_time")   # the operator accepts the loss
    engine = ShardEngine.open(str(path), 0, 1, CONFIG)
    try:
        kept = present(engine)
        assert kept == list(range(1, len(kept) + 1)) and 0 < len(kept) < N * 3 // 4
        assert "dropping intact writes" in engine.storage.recovery_note
    finally:
        engine.close()


def test_a_zeroed_sst_block_is_an_error_not_an_absent_key(tmp_path):
    """A read stopped by a damaged block ended the iterator like the end of the data:
    its keys read as never written, and a txn that read one at version 0 committed."""
    path = make_shard(tmp_path / "s", flush=True)
    sst = max(path.glob("*.sst"), key=lambda p: p.stat().st_size)
    with open(sst, "r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 4096)
    engine = ShardEngine.open(str(path), 0, 1, CONFIG)
    try:
        damaged = []
        for i in range(1, N + 1):
            try:
                assert engine.read([b"k%05d" % i], N)[0] == (b"v" * 200, i)
            except DamagedDatabase as exc:
                assert sst.name in str(exc) and "checksum" in str(exc)
                damaged.append(i)
        assert damaged
        with pytest.raises(DamagedDatabase):
            engine.commit(N + 1, [(b"k%05d" % damaged[0], 0)], [(b"x", b"y")])
        assert engine.read([b"x"], N + 1) == [(None, 0)]
    finally:
        engine.close()


def test_a_shard_without_current_is_refused_and_the_advice_repairs_it(tmp_path):
    """CURRENT names the MANIFEST; without it RocksDB would create a new, empty database
    (it refused only while a log file was left, with a message about a new Db)."""
    path = make_shard(tmp_path / "s", flush=True)
    (path / "CURRENT").unlink()
    for log in path.glob("*.log"):
        log.unlink()
    with pytest.raises(DamagedDatabase) as refused:
        ShardEngine.open(str(path), 0, 1, CONFIG)
    manifest = next(path.glob("MANIFEST-*")).name
    assert "no CURRENT" in str(refused.value) and f"writing the line {manifest} into CURRENT" in str(refused.value)
    assert not (path / "CURRENT").exists()
    (path / "CURRENT").write_text(manifest + "\n")
    engine = ShardEngine.open(str(path), 0, 1, CONFIG)
    try:
        assert present(engine) == list(range(1, N + 1))
    finally:
        engine.close()


def test_a_missing_manifest_is_refused_by_name(tmp_path):
    path = make_shard(tmp_path / "s", flush=True)
    manifest = next(path.glob("MANIFEST-*"))
    manifest.unlink()
    with pytest.raises(DamagedDatabase, match=f"missing.*{manifest.name}.*restore"):
        ShardEngine.open(str(path), 0, 1, CONFIG)


@pytest.mark.parametrize("cf, key, value, named", [
    ("meta", cl.FLUSHED_SEQ, b"\xc1garbage", "meta row 'flushed_seq'"),
    ("meta", cl.BLOCK, b"\xa3abc", "meta row 'block_height'"),      # decodes, as a string
    ("meta", cl.SHARD_ID, b"\xff", "meta row 'shard_id'"),
    ("meta", cl.PREPARED_FMT % 7, b"\x93\x01\x02\x03", "meta row b'prepared/7'"),
    ("log", be64(10_000), b"\xc1", "commit-log row 10000"),
    ("log", be64(10_000), b"\x91\x91\x01", "commit-log row 10000"),   # [[1]]: a commit without writes
])
def test_damaged_meta_and_log_rows_are_refused_by_name(tmp_path, cf, key, value, named):
    path = make_shard(tmp_path / "s", flush=True)
    storage = open_db(str(path))
    storage.put(cf, key, value)
    storage.close()
    with pytest.raises(DamagedDatabase) as refused:
        ShardEngine.open(str(path), 0, 1, CONFIG)
    assert named in str(refused.value) and str(path) in str(refused.value)
