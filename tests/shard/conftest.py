import pytest

from shard.config import EngineConfig
from shard.engine import ShardEngine


@pytest.fixture
def small_config():
    """Small knobs so flush/prune chunking and the cache are exercised by small tests."""
    return EngineConfig(flush_on_start=False, prune_step_keys=3, max_cached_keys=4,
                        batch_writer={"min_chunk": 2, "max_chunk": 8},
                        rocksdb={"write_buffer_bytes": 1 << 20, "block_cache_bytes": 1 << 20})


@pytest.fixture
def open_engine(tmp_path, small_config):
    """open_engine(shard_id=0, shard_count=1, config=None) -> engine; all closed at teardown."""
    opened = []

    def _open(shard_id=0, shard_count=1, config=None, path=None):
        engine = ShardEngine.open(str(path or tmp_path / "shard"), shard_id, shard_count,
                                  config or small_config)
        opened.append(engine)
        return engine

    yield _open
    for engine in opened:
        engine.close()


@pytest.fixture
def booted_worker(tmp_path, monkeypatch):
    """booted_worker(config) -> a real ShardWorker (shard 0 of 1) in this process, booted
    (its RocksDB, its Unix socket), not looping: a test drives it. Shut down at teardown."""
    from shard import worker as worker_module
    from shard.worker import ShardWorker
    monkeypatch.setattr(worker_module, "tune_gc", lambda: None)   # not this process's GC
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    booted = []

    def _boot(config: dict, data_dir=None) -> ShardWorker:
        w = ShardWorker({"shard": 0, "shards": 1, "data_dir": str(data_dir or tmp_path / "data"),
                         "run_dir": str(run_dir), "config": config})
        w.boot()
        booted.append(w)
        return w

    yield _boot
    for w in booted:
        w.shutdown()
