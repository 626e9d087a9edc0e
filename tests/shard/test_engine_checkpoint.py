"""Checkpoints: consistent copy at a ts, restore keeps old data until the copy opens."""
import os

import pytest

from shard.checkpoint import read_manifest, restore_shard, verify_shard_dir
from shard.errors import StorageMismatch


def test_checkpoint_restore_roundtrip_with_deletes(open_engine, tmp_path):
    e = open_engine(shard_id=1, shard_count=2)
    e.commit(1, [], [(b"a", b"1"), (b"b", b"1"), (b"gone", b"x")])
    e.flush()
    e.commit(2, [], [(b"gone", None), (b"c", b"2")])     # unflushed: only in the log
    e.set_block(4)
    info = e.create_checkpoint(str(tmp_path / "ck" / "shard-1"), 2)
    assert info["bytes"] > 0 and info["ts"] == 2 and info["block"] == 4
    assert read_manifest(str(tmp_path / "ck" / "shard-1"))["shard"] == 1
    e.commit(3, [], [(b"a", b"later"), (b"gone", b"back")])
    e.flush()
    e.close()
    restore_shard(str(tmp_path / "ck" / "shard-1"), str(tmp_path / "shard"))
    assert not os.path.exists(str(tmp_path / "shard") + ".restore-old")
    e = open_engine(shard_id=1, shard_count=2)
    assert e.read([b"a", b"b", b"c", b"gone"], 10) == [(b"1", 1), (b"1", 1), (b"2", 2), (None, 0)]
    assert e.max_ts == 2 and e.block_height == 4 and e.stats()["keys"] == 3


def test_restore_of_wrong_shard_keeps_old_data(open_engine, tmp_path):
    e = open_engine(shard_id=0, shard_count=2)
    e.commit(1, [], [(b"a", b"1")])
    e.create_checkpoint(str(tmp_path / "ck0"), 1)
    e.close()
    with pytest.raises(StorageMismatch, match="expected shard 1 of 2"):
        restore_shard(str(tmp_path / "ck0"), str(tmp_path / "shard"), shard_id=1, shard_count=2)
    with pytest.raises(StorageMismatch):
        restore_shard(str(tmp_path / "nope"), str(tmp_path / "shard"), 0, 2)
    assert not os.path.exists(str(tmp_path / "shard") + ".restore-tmp")
    verify_shard_dir(str(tmp_path / "shard"), 0, 2)
    assert open_engine(shard_id=0, shard_count=2).read([b"a"], 1) == [(b"1", 1)]
