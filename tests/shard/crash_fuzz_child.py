"""Crash-fuzz child: one incarnation of a shard driven by random engine calls, checked
against a model, ending in a crash.

    python crash_fuzz_child.py SHARD_DIR EVENTS_FILE SEED OPS

It opens the shard, rebuilds the model from EVENTS_FILE (one JSON line per acknowledged
step: a step is appended only after the engine's sync, so the file holds exactly what
the shard acknowledged), and checks the shard against it: prepared txns, outcome
records, max_ts, reads at several snapshots (correct, or TooOld below the horizon),
a scan, and the live-key count. Then it runs OPS random calls: commits with reads and
deletes, prepare / commit_prepared / abort_prepared / forget, flush start and steps,
whole flushes, the freeing of flushed memtables, prune start and steps, pins, a
checkpoint restored and checked, a clean reopen. A crash point may be armed on the way
(after a flush chunk written WAL off, with or without RocksDB flushing it to an SST;
right after a flush's meta write; at the log truncation; after a disk prune step), and
the child otherwise ends with os._exit, a txn staged but never synced. A mismatch prints
MISMATCH and exits 3. Written by an audit that found the live-key bug this way.
"""
import json
import os
import random
import shutil
import sys
import tempfile

from shard.checkpoint import restore_shard
from shard.config import EngineConfig
from shard.engine import ShardEngine
from shard.errors import Conflict, TooOld
from shard import prune as prune_module

MISMATCH_EXIT = 3

KEYS = [b"a", b"b", b"c", b"a\x00", b"d", b"e"]


def config(rng):
    return EngineConfig(flush_on_start=rng.random() < 0.5, prune_step_keys=rng.choice([1, 2, 3]),
                        max_cached_keys=rng.choice([1, 2, 100]),
                        batch_writer={"min_chunk": 1, "max_chunk": 3},
                        rocksdb={"write_buffer_bytes": 1 << 16, "block_cache_bytes": 1 << 20})


class Model:
    def __init__(self):
        self.hist = {}          # key -> [(ts, value)]
        self.prepared = {}      # txn -> (ts, reads, writes dict)
        self.outcomes = {}
        self.max_ts = 0
        self.next_txn = 1

    def apply(self, ev):
        kind = ev[0]
        if kind == "c":
            _, ts, writes = ev
            for k, v in writes:
                self.hist.setdefault(bytes.fromhex(k), []).append((ts, None if v is None else bytes.fromhex(v)))
            self.max_ts = max(self.max_ts, ts)
        elif kind == "p":
            _, txn, ts, reads, writes = ev
            self.prepared[txn] = (ts, [bytes.fromhex(k) for k in reads],
                                  {bytes.fromhex(k): (None if v is None else bytes.fromhex(v)) for k, v in writes})
            self.max_ts = max(self.max_ts, ts)
            self.next_txn = max(self.next_txn, txn + 1)
        elif kind == "cp":
            _, txn, ts = ev
            _, _, writes = self.prepared.pop(txn)
            for k, v in writes.items():
                self.hist.setdefault(k, []).append((ts, v))
            self.outcomes[txn] = ts
            self.max_ts = max(self.max_ts, ts)
        elif kind == "a":
            self.prepared.pop(ev[1])
        elif kind == "f":
            for t in ev[1]:
                self.outcomes.pop(t, None)
        elif kind == "n":       # txn id consumed
            self.next_txn = max(self.next_txn, ev[1] + 1)

    def value_at(self, key, at):
        best = (0, None)
        for ts, v in self.hist.get(key, []):
            if ts <= at and ts >= best[0]:
                best = (ts, v)
        return (None, 0) if best[1] is None else (best[1], best[0])

    def version(self, key):
        return self.value_at(key, self.max_ts)[1]

    def locked(self, writes_only):
        keys = set()
        for _, reads, writes in self.prepared.values():
            keys.update(writes)
            if not writes_only:
                keys.update(reads)
        return keys

    def write_locked_at(self, at):
        keys = set()
        for ts, _, writes in self.prepared.values():
            if ts <= at:
                keys.update(writes)
        return keys


def load_model(events_path):
    m = Model()
    if os.path.exists(events_path):
        with open(events_path) as f:
            for line in f:
                if line.strip():
                    m.apply(json.loads(line))
    return m


def hx(b):
    return None if b is None else b.hex()


def check(e, m, rng, where):
    errs = []
    exp_prep = [{"txn": t, "ts": p[0], "participants": [0, 1]} for t, p in sorted(m.prepared.items())]
    if e.prepared() != exp_prep:
        errs.append(f"prepared {e.prepared()} != {exp_prep}")
    got_out = {t: e.outcome(t) for t in e.outcome_txns()}
    if got_out != m.outcomes:
        errs.append(f"outcomes {got_out} != {m.outcomes}")
    if e.max_ts != m.max_ts:
        errs.append(f"max_ts {e.max_ts} != {m.max_ts}")
    ats = sorted({m.max_ts, m.max_ts + 5} | {rng.randint(0, m.max_ts + 1) for _ in range(4)} | set(e.pins))
    for at in ats:
        keys = [k for k in KEYS if k not in m.write_locked_at(at)]
        try:
            got = e.read(keys, at)
        except TooOld:
            if at >= m.max_ts or at in e.pins:
                errs.append(f"TooOld at {at} (max_ts {m.max_ts}, horizon {e.horizon})")
            continue
        exp = [m.value_at(k, at) for k in keys]
        if got != exp:
            errs.append(f"read at {at}: {list(zip(keys, got, exp))} horizon={e.horizon}")
    # scan at max_ts (if no lock blocks it)
    at = m.max_ts
    if not m.write_locked_at(at):
        try:
            items, _ = e.scan(None, None, 100, at)
            exp = [(k, *m.value_at(k, at)) for k in sorted(KEYS) if m.value_at(k, at)[0] is not None]
            if items != exp:
                errs.append(f"scan at {at}: {items} != {exp}")
        except TooOld:
            pass
    live = sum(1 for k in KEYS if m.value_at(k, m.max_ts)[0] is not None)
    if e.live_keys != live:
        errs.append(f"live_keys {e.live_keys} != {live}")
    if errs:
        print(f"MISMATCH {where}:\n  " + "\n  ".join(errs), flush=True)
        os._exit(MISMATCH_EXIT)


def pick_keys(m, rng):
    """(keys to write, keys to read) for a new txn that no prepared txn's lock refuses:
    writes avoid every locked key, reads the write-locked ones. None when all are locked."""
    free = [k for k in KEYS if k not in m.locked(False)]
    if not free:
        return None
    readable = [k for k in KEYS if k not in m.locked(True)]
    return (rng.sample(free, rng.randint(1, min(2, len(free)))),
            rng.sample(readable, rng.randint(0, min(2, len(readable)))))


def main():
    path, events_path, seed, nops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    m = load_model(events_path)
    cfg = config(rng)
    e = ShardEngine.open(path, 0, 2, cfg)
    check(e, m, rng, f"after open seed={seed} fos={cfg.flush_on_start}")
    evf = open(events_path, "a")

    def ack(ev):
        e.sync()
        evf.write(json.dumps(ev) + "\n")
        evf.flush()
        m.apply(ev)

    crash_hook = rng.choice(["none", "none", "truncate", "meta", "write_pairs", "staged", "prune_write"])
    hook_armed = [False]

    def arm():
        """Make the chosen crash point crash the process when it is next reached."""
        hook_armed[0] = True
        st = e.storage
        if crash_hook == "truncate":
            e.log.truncate = lambda upto: os._exit(0)
        elif crash_hook == "meta":
            orig_write = st.write

            def w(batch, wal=True, sync=False):
                orig_write(batch, wal, sync)
                # crash right after a flush's meta write (it sets FLUSHED_SEQ)
                if e.flush_job is not None and e.flush_job.done:
                    os._exit(0)
            st.write = w
        elif crash_hook == "write_pairs":
            orig_wp = st.write_pairs
            cnt = [rng.randint(1, 3)]

            def wp(cf, keys, values, wal):
                orig_wp(cf, keys, values, wal)
                cnt[0] -= 1
                if cnt[0] <= 0:
                    if rng.random() < 0.5:
                        st.flush(("data",))     # the chunk reached an SST
                    os._exit(0)
            st.write_pairs = wp
        elif crash_hook == "prune_write":
            orig_pd = prune_module.PruneJob._prune_disk

            def pd(self):
                orig_pd(self)
                if rng.random() < 0.5:
                    os._exit(0)
            prune_module.PruneJob._prune_disk = pd

    for i in range(nops):
        if not hook_armed[0] and crash_hook != "none" and crash_hook != "staged" and rng.random() < 0.05:
            arm()
        r = rng.random()
        if r < 0.30:
            picked = pick_keys(m, rng)
            if picked is None:
                continue
            wk, rk = picked
            ts = m.max_ts + 1
            writes = [(k, None if rng.random() < 0.3 else b"v%d" % ts) for k in wk]
            try:
                e.commit(ts, [(k, m.version(k)) for k in rk], writes)
            except Conflict as exc:
                print(f"MISMATCH unexpected conflict seed={seed} op={i}: {exc}", flush=True)
                os._exit(MISMATCH_EXIT)
            ack(["c", ts, [[k.hex(), hx(v)] for k, v in writes]])
        elif r < 0.40:
            picked = pick_keys(m, rng)
            if picked is None:
                continue
            wk, rk = picked
            ts = m.max_ts + 1
            txn = m.next_txn
            writes = [(k, None if rng.random() < 0.3 else b"p%d" % ts) for k in wk]
            try:
                e.prepare(txn, ts, [(k, m.version(k)) for k in rk], writes, [0, 1])
            except Conflict as exc:
                print(f"MISMATCH unexpected prepare conflict seed={seed} op={i}: {exc}", flush=True)
                os._exit(MISMATCH_EXIT)
            ack(["p", txn, ts, [k.hex() for k in rk], [[k.hex(), hx(v)] for k, v in writes]])
        elif r < 0.48 and m.prepared:
            txn = rng.choice(sorted(m.prepared))
            e.commit_prepared(txn, m.prepared[txn][0])
            ack(["cp", txn, m.prepared[txn][0]])
        elif r < 0.52 and m.prepared:
            txn = rng.choice(sorted(m.prepared))
            e.abort_prepared(txn)
            ack(["a", txn])
        elif r < 0.56 and m.outcomes:
            txns = rng.sample(sorted(m.outcomes), rng.randint(1, len(m.outcomes)))
            e.forget(txns)
            ack(["f", txns])
        elif r < 0.64:
            if e.flush_job is None:
                e.start_flush()
        elif r < 0.76:
            for _ in range(rng.randint(1, 3)):
                e.flush_step()
        elif r < 0.78:
            e.flush()
        elif r < 0.82:
            e.release_step(versions=rng.randint(1, 4))
        elif r < 0.85:
            if e.prune_job is None:
                e.start_prune(rng.choice([1, 1, 2]))
        elif r < 0.92:
            for _ in range(rng.randint(1, 3)):
                e.prune_step()
            e.sync()
        elif r < 0.925:
            if e.pins and rng.random() < 0.5:
                e.unpin(rng.choice(sorted(e.pins)))
            else:
                at = rng.randint(e.horizon, m.max_ts + 1)
                e.pin(at)
        elif r < 0.93:
            cdir = tempfile.mkdtemp(dir=os.path.dirname(path)) + "/ck"
            e.create_checkpoint(cdir, m.max_ts)
            rdir = cdir + "-restored"
            restore_shard(cdir, rdir)
            ce = ShardEngine.open(rdir, 0, 2, config(rng))
            check(ce, m, rng, f"checkpoint op {i} seed={seed}")
            ce.close()
            shutil.rmtree(os.path.dirname(cdir), ignore_errors=True)
        elif r < 0.94:
            e.close()
            e = ShardEngine.open(path, 0, 2, config(rng))
        else:
            check(e, m, rng, f"op {i} seed={seed}")
    check(e, m, rng, f"end seed={seed}")
    if crash_hook == "staged":
        free = [k for k in KEYS if k not in m.locked(False)]
        if free:
            e.commit(m.max_ts + 1, [], [(free[0], b"lost")])   # staged, never synced
    os._exit(0)


if __name__ == "__main__":
    main()
