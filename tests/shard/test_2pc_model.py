"""Property test: 2PC state (prepared txns, their locks, outcomes) across flushes,
restarts and crashes, against a plain model.

The 2PC records ride in the commit log and a flush keeps a snapshot of them in meta
(shard/commitlog.py). Random sequences of prepare / commit_prepared / abort_prepared /
forget / commit, interleaved with whole and partial flushes, clean reopens and crashes
that lose the staged (unsynced) records, must leave exactly the model's state.
"""
import shutil
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from shard.config import EngineConfig
from shard.engine import ShardEngine

from tests.shard.flush_rules import FlushRules

KEYS = [b"a", b"b", b"c", b"d", b"e", b"f"]
CONFIG = EngineConfig(flush_on_start=False, prune_step_keys=2, max_cached_keys=3,
                      batch_writer={"min_chunk": 1, "max_chunk": 2},
                      rocksdb={"write_buffer_bytes": 1 << 20, "block_cache_bytes": 1 << 20})


class TwoPCVsModel(FlushRules):
    @initialize()
    def setup(self):
        self.tmp = tempfile.mkdtemp(prefix="2pc-model-")
        self.path = self.tmp + "/shard"
        self.engine = ShardEngine.open(self.path, 0, 2, CONFIG)
        self.ts = 0
        self.next_txn = 1
        self.data = {}          # key -> (value, version) of the newest committed write
        self.prepared = {}      # txn -> (ts, read_keys, {key: value})
        self.outcomes = {}      # txn -> commit ts

    def teardown(self):
        if hasattr(self, "engine"):
            self.engine.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def locked(self, writes_only: bool) -> set:
        keys = set()
        for _, reads, writes in self.prepared.values():
            keys.update(writes)
            if not writes_only:
                keys.update(reads)
        return keys

    def version(self, key) -> int:
        value, version = self.data.get(key, (None, 0))
        return 0 if value is None else version       # a deleted key reads as version 0

    @rule(data=st.data())
    def prepare(self, data):
        free = [k for k in KEYS if k not in self.locked(writes_only=False)]
        if not free:
            return
        write_keys = data.draw(st.lists(st.sampled_from(free), min_size=1, max_size=2, unique=True))
        readable = [k for k in KEYS if k not in self.locked(writes_only=True)]
        read_keys = data.draw(st.lists(st.sampled_from(readable), max_size=2, unique=True))
        writes = {k: data.draw(st.one_of(st.none(), st.binary(max_size=3))) for k in write_keys}
        self.ts += 1
        txn, self.next_txn = self.next_txn, self.next_txn + 1
        self.engine.prepare(txn, self.ts, [(k, self.version(k)) for k in read_keys],
                            list(writes.items()), [0, 1])
        self.engine.sync()
        self.prepared[txn] = (self.ts, read_keys, writes)

    @precondition(lambda self: self.prepared)
    @rule(data=st.data())
    def commit_prepared(self, data):
        txn = data.draw(st.sampled_from(sorted(self.prepared)))
        ts, _, writes = self.prepared.pop(txn)
        self.engine.commit_prepared(txn, ts)
        self.engine.sync()
        for key, value in writes.items():
            self.data[key] = (value, ts)
        self.outcomes[txn] = ts

    @precondition(lambda self: self.prepared)
    @rule(data=st.data())
    def abort_prepared(self, data):
        txn = data.draw(st.sampled_from(sorted(self.prepared)))
        del self.prepared[txn]
        self.engine.abort_prepared(txn)
        self.engine.sync()

    @precondition(lambda self: self.outcomes)
    @rule(data=st.data())
    def forget(self, data):
        txns = data.draw(st.lists(st.sampled_from(sorted(self.outcomes)), min_size=1, unique=True))
        for txn in txns:
            del self.outcomes[txn]
        self.engine.forget(txns + [10**9])          # an unknown id is ignored
        self.engine.sync()

    @rule(data=st.data())
    def commit(self, data):
        free = [k for k in KEYS if k not in self.locked(writes_only=False)]
        if not free:
            return
        key = data.draw(st.sampled_from(free))
        self.ts += 1
        self.engine.commit(self.ts, [(key, self.version(key))], [(key, b"c%d" % self.ts)])
        self.engine.sync()
        self.data[key] = (b"c%d" % self.ts, self.ts)

    @rule()
    def reopen(self):
        self.engine.close()
        self.engine = ShardEngine.open(self.path, 0, 2, CONFIG)

    @rule(data=st.data())
    def crash_losing_staged_steps(self, data):
        """2PC steps staged but never synced (no reply was sent) vanish in a crash."""
        if self.prepared and data.draw(st.booleans()):
            self.engine.commit_prepared(min(self.prepared), self.prepared[min(self.prepared)][0])
        if self.outcomes:
            self.engine.forget(sorted(self.outcomes))
        self.engine.log.records.clear()
        self.engine.log.meta.clear()
        self.engine.close()
        self.engine = ShardEngine.open(self.path, 0, 2, CONFIG)

    @invariant()
    def engine_matches_model(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        assert e.prepared() == [{"txn": t, "ts": p[0], "participants": [0, 1]}
                                for t, p in sorted(self.prepared.items())]
        assert {t: e.outcome(t) for t in e.outcome_txns()} == self.outcomes
        # every key a prepared txn writes is write-locked by it; no lock outlives its txn
        for txn, (_, _, writes) in self.prepared.items():
            for key in writes:
                assert e.locks[key][0] == txn and e.locks[key][2]
        assert {lock[0] for lock in e.locks.values()} <= set(self.prepared)
        unlocked = [k for k in KEYS if k not in self.locked(writes_only=True)]
        expected = []
        for key in unlocked:
            value, version = self.data.get(key, (None, 0))
            expected.append((None, 0) if value is None else (value, version))
        assert e.read(unlocked, self.ts) == expected
        assert e.max_ts == self.ts

TwoPCVsModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
test_2pc_state_matches_model = TwoPCVsModel.TestCase
