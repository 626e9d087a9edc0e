import pytest

from shard.storage import open_db


@pytest.fixture
def storage(tmp_path):
    s = open_db(str(tmp_path / "db"), {"block_cache_bytes": 1 << 20})
    yield s
    s.close()


def test_column_families_are_separate_and_raw(storage):
    storage.put("data", b"k", b"\x00\xff")
    storage.put("meta", b"k", b"m")
    assert storage.get("data", b"k") == b"\x00\xff"
    assert storage.get("meta", b"k") == b"m"
    assert storage.get("log", b"k") is None


def test_iterate_bounds_prefix_and_seek(storage):
    storage.write_batch([("data", k, k.upper()) for k in (b"a1", b"a2", b"b1", b"c1")], wal=True)
    assert [k for k, _ in storage.iterate("data", start=b"a2", stop=b"c1")] == [b"a2", b"b1"]
    assert [k for k, _ in storage.iterate("data", prefix=b"a")] == [b"a1", b"a2"]
    assert storage.seek("data", b"a15", b"a") == (b"a2", b"A2")
    assert storage.seek("data", b"a3", b"a") is None
    assert storage.last_key("data") == b"c1"


def test_batch_is_atomic_put_delete_and_range(storage):
    batch = storage.batch()
    for i in range(5):
        batch.put("log", bytes([i]), b"x")
    storage.write(batch)
    batch = storage.batch()
    batch.delete_range("log", bytes([0]), bytes([3]))
    batch.delete("log", bytes([4]))
    storage.write(batch, sync=True)
    assert [k for k, _ in storage.iterate("log")] == [bytes([3])]


def test_reopen_keeps_wal_writes_and_checkpoint_copies(tmp_path):
    s = open_db(str(tmp_path / "db"))
    s.put("data", b"k", b"v")
    s.write_batch([("data", b"w", b"1")], wal=False)
    s.flush(("data",))
    s.checkpoint(str(tmp_path / "ck"))
    assert s.property_int("rocksdb.estimate-num-keys") >= 1
    s.close()
    s = open_db(str(tmp_path / "ck"), create=False)
    assert s.get("data", b"k") == b"v" and s.get("data", b"w") == b"1"
    s.close()


def test_open_missing_without_create_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_db(str(tmp_path / "nothing"), create=False)


def test_bad_compression_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compression"):
        open_db(str(tmp_path / "db"), {"compression": "gzip"})


def test_write_pairs_puts_into_the_named_column_family_only(storage):
    storage.write_pairs("data", [b"a", b"b\x00"], [b"1", b"\x00"], wal=False)
    storage.write_pairs("meta", [b"a"], [b"m"], wal=True)
    assert [(k, v) for k, v in storage.iterate("data")] == [(b"a", b"1"), (b"b\x00", b"\x00")]
    assert storage.get("meta", b"a") == b"m" and storage.get("log", b"a") is None


def test_restarts_do_not_pile_up_rocksdb_info_logs(tmp_path):
    """Every open starts a new RocksDB info LOG; a shard restarted again and again (crash
    loops, the soak's SIGKILLs) must not keep them all: the directory stays bounded."""
    from shard.storage import INFO_LOG_FILES_KEPT
    path = str(tmp_path / "db")
    for i in range(12):
        s = open_db(path)
        s.put("meta", b"k", b"%d" % i)
        s.close()
    logs = [p.name for p in (tmp_path / "db").iterdir() if p.name.startswith("LOG")]
    assert "LOG" in logs and len(logs) <= INFO_LOG_FILES_KEPT, logs
    s = open_db(path)
    assert s.get("meta", b"k") == b"11"
    s.close()
