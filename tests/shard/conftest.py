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
