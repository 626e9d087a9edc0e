"""Property test: the engine against a plain in-memory model.

Model: {key: [(ts, value | None), ...]} ts ascending. Random sequences of commits (with
current or stale read versions), deletes, snapshot reads at past ts, scans, flushes,
prunes, checkpoint + restore and close/reopen must agree with it.
"""
import copy
import shutil
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from shard.checkpoint import restore_shard
from shard.config import EngineConfig
from shard.engine import ShardEngine
from shard.errors import Conflict, TooOld

from tests.shard.flush_rules import FlushRules

KEYS = [b"a", b"a\x00", b"b", b"c\xff", b"d", b"e"]
keys_st = st.sampled_from(KEYS)
values_st = st.one_of(st.none(), st.binary(max_size=4))
CONFIG = EngineConfig(flush_on_start=False, prune_step_keys=2, max_cached_keys=3,
                      batch_writer={"min_chunk": 2, "max_chunk": 4},
                      rocksdb={"write_buffer_bytes": 1 << 20, "block_cache_bytes": 1 << 20})


def model_at(chain, at):
    for ts, value in reversed(chain):
        if ts <= at:
            return (None, 0) if value is None else (value, ts)
    return (None, 0)


class EngineVsModel(FlushRules):
    @initialize()
    def setup(self):
        self.tmp = tempfile.mkdtemp(prefix="model-")
        self.path = self.tmp + "/shard"
        self.engine = ShardEngine.open(self.path, 0, 1, CONFIG)
        self.model = {}
        self.ts = 0                  # the last ts handed out (a conflict uses one up)
        self.committed_ts = 0
        self.horizon = 0
        self.checkpoint = None

    def teardown(self):
        if hasattr(self, "engine"):
            self.engine.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def current(self, key):
        return model_at(self.model.get(key, []), self.ts)[1]

    @rule(writes=st.lists(st.tuples(keys_st, values_st), min_size=1, max_size=3),
          read_keys=st.lists(keys_st, max_size=2), stale=st.booleans())
    def commit(self, writes, read_keys, stale):
        reads = [(k, self.current(k) + (1 if stale else 0)) for k in read_keys]
        self.ts += 1
        if stale and reads:
            try:
                self.engine.commit(self.ts, reads, writes)
            except Conflict as c:
                assert sorted(set(c.keys)) == sorted(set(read_keys))
                return
            raise AssertionError("stale read versions committed")
        self.engine.commit(self.ts, reads, writes)
        self.committed_ts = self.ts
        final = dict(writes)
        for key, value in final.items():
            self.model.setdefault(key, []).append((self.ts, value))
        self.engine.sync()

    @rule(data=st.data())
    def read_past(self, data):
        at = data.draw(st.integers(0, self.ts + 1))
        if at < self.horizon:
            try:
                self.engine.read(KEYS, at)
            except TooOld:
                return
            raise AssertionError(f"read at {at} below horizon {self.horizon} answered")
        got = self.engine.read(KEYS, at)
        assert got == [model_at(self.model.get(k, []), at) for k in KEYS], at

    @rule(data=st.data(), limit=st.integers(1, 7))
    def scan(self, data, limit):
        at = data.draw(st.integers(self.horizon, self.ts + 1))
        start = data.draw(st.one_of(st.none(), keys_st))
        end = data.draw(st.one_of(st.none(), keys_st))
        live = []
        for key in sorted(self.model):
            if (start is None or key >= start) and (end is None or key < end):
                value, version = model_at(self.model[key], at)
                if value is not None:
                    live.append((key, value, version))
        items, more = self.engine.scan(start, end, limit, at)
        assert items == live[:limit] and more == (len(live) > limit)

    @rule(keep=st.integers(1, 3))
    def prune(self, keep):
        self.engine.prune(keep)
        model_horizon = self.horizon
        for chain in self.model.values():
            if len(chain) > keep:
                model_horizon = max(model_horizon, chain[-keep][0])
        # The engine may keep one more version per key (the newest row on disk) until the
        # next flush + prune, so its horizon may lag the model's, never lead it.
        assert self.horizon <= self.engine.horizon <= model_horizon
        self.horizon = self.engine.horizon

    @rule()
    def reopen(self):
        self.engine.close()
        self.engine = ShardEngine.open(self.path, 0, 1, CONFIG)
        assert self.engine.max_ts == self.committed_ts

    @rule()
    def take_checkpoint(self):
        dest = f"{self.tmp}/ck{self.ts}"
        if self.checkpoint is None or self.checkpoint[0] != dest:
            self.engine.create_checkpoint(dest, self.ts)
            self.checkpoint = (dest, copy.deepcopy(self.model), self.committed_ts, self.horizon)

    @precondition(lambda self: self.checkpoint is not None)
    @rule()
    def restore(self):
        dest, model, ts, horizon = self.checkpoint
        self.engine.close()
        restore_shard(dest, self.path)
        self.engine = ShardEngine.open(self.path, 0, 1, CONFIG)
        self.model, self.horizon = copy.deepcopy(model), horizon
        assert self.engine.max_ts == ts
        self.committed_ts = ts          # self.ts stays: commit ts never go back

    @invariant()
    def live_key_count_is_exact(self):
        if hasattr(self, "engine"):
            live = sum(1 for chain in self.model.values() if chain[-1][1] is not None)
            assert self.engine.stats()["keys"] == live


EngineVsModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
test_engine_matches_model = EngineVsModel.TestCase
