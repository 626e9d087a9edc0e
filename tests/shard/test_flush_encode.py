"""The flush's hand-written row encoder builds exactly keycodec's rows, and a flush split
in two (the first half flushed in the background) writes exactly those rows too."""
from hypothesis import given, settings, strategies as st

import shard.flush as flush_module
from shard.flush import encode_rows
from shard.keycodec import tag, version_key

# Keys drawn from a small alphabet that includes 0x00 and 0xff, so escapes are common.
keys = st.binary(min_size=1, max_size=12) | st.lists(
    st.sampled_from(b"\x00\x01\xffa"), min_size=1, max_size=6).map(bytes)
values = st.one_of(st.none(), st.binary(max_size=8))
chain_lists = st.lists(st.tuples(st.integers(1, 2**63), values), min_size=1, max_size=4).map(
    lambda versions: sorted(dict(versions).items()))      # ascending ts, one value per ts
memtables = st.dictionaries(keys, chain_lists, max_size=20)


def expected_rows(memtable):
    return [(version_key(key, ts), tag(value))
            for key, chain in memtable.items() for ts, value in chain]


@given(memtables)
def test_encode_rows_matches_keycodec(memtable):
    taken, vkeys, values = encode_rows(iter(memtable.items()))
    assert taken == len(memtable)
    assert list(zip(vkeys, values)) == expected_rows(memtable)


@given(memtables, st.integers(1, 5), st.data())
def test_chunked_encode_with_cache_and_pruned_chains(memtable, chunk, data):
    """Chunk by chunk, as FlushJob does, while a prune replaces chains that were not
    reached yet by their survivors (the newest version always survives): the rows are
    keycodec's rows of the chains as they are when their chunk is encoded, and every
    cached key ends up naming its newest version."""
    from itertools import islice
    keys_in_order = list(memtable)
    cached = {key: (0, None) for key in data.draw(st.lists(st.sampled_from(keys_in_order)))
              } if keys_in_order else {}
    items = iter(memtable.items())
    seen, rows = [], []
    while True:
        # prune: a not yet encoded key keeps its newest version only
        pending = keys_in_order[len(seen):]
        if pending:
            victim = data.draw(st.sampled_from(pending))
            memtable[victim] = memtable[victim][-1:]
        taken, vkeys, vals = encode_rows(islice(items, chunk), cached)
        seen += keys_in_order[len(seen):len(seen) + taken]
        rows += zip(vkeys, vals)
        if taken < chunk:
            break
    assert seen == keys_in_order
    assert rows == expected_rows(memtable)
    assert cached == {key: memtable[key][-1] for key in cached}


def test_encode_rows_escapes_zero_bytes_and_tags_tombstones():
    taken, vkeys, values = encode_rows(iter([(b"a\x00b", [(1, None), (2, b"")])]))
    assert taken == 1
    assert vkeys == [b"a\x00\xffb\x00\x01" + (2**64 - 2).to_bytes(8, "big"),
                     b"a\x00\xffb\x00\x01" + (2**64 - 3).to_bytes(8, "big")]
    assert values == [b"\x00", b"\x01"]


def test_flush_keeps_cached_rows_current(open_engine):
    """A key cached before the flush reads its newest version through the cache after."""
    e = open_engine()
    e.commit(1, [], [(b"k", b"1")])
    e.flush()
    assert e.read([b"k"], 1) == [(b"1", 1)]           # caches the on-disk row
    e.commit(2, [], [(b"k", b"2"), (b"n", None)])
    e.flush()
    assert e.cache.get(b"k") == (2, b"2")
    assert e.read([b"k", b"n"], 2) == [(b"2", 2), (None, 0)]
    assert e.read([b"k"], 1) == [(b"1", 1)]


def _split_workload(e):
    """60 keys (some with 0 bytes), 3 versions each, every third version a delete."""
    names = [b"k%02d" % i if i % 4 else b"z\x00%02d" % i for i in range(60)]
    for ts in range(1, 4):
        e.commit(ts, [], [(k, None if (i + ts) % 3 == 0 else b"v%d" % ts)
                          for i, k in enumerate(names)])
    e.sync()
    return names


def _reads_from(memtable, names, at):
    """What read(names, at) must answer, from a copy of the chains."""
    out = []
    for key in names:
        ts, value = [v for v in memtable[key] if v[0] <= at][-1]
        out.append((None, 0) if value is None else (value, ts))
    return out


def _spy_flushes(e) -> list:
    """[(versions written when called, wait), ...] of the engine's storage.flush calls."""
    calls = []
    real = e.storage.flush

    def flush(cfs, wait=True):
        calls.append((e.flush_job.ops, wait))
        return real(cfs, wait)
    e.storage.flush = flush
    return calls


def test_split_flush_writes_keycodec_rows(open_engine, monkeypatch):
    monkeypatch.setattr(flush_module, "SPLIT_MIN_VERSIONS", 100)
    e = open_engine()
    names = _split_workload(e)
    memtable = {k: list(chain) for k, chain in e.active.items()}
    calls = _spy_flushes(e)
    result = e.flush()
    assert result["keys"] == 60
    assert list(e.storage.iterate("data")) == sorted(expected_rows(memtable))
    # the background flush started once half of the 180 versions were written (chunks of
    # at most 8 keys x 3 versions), then the finishing flush waited
    assert len(calls) == 2 and 90 <= calls[0][0] < 90 + 24 and calls[0][1] is False
    assert calls[1] == (180, True)
    for at in (1, 2, 3):
        assert e.read(names, at) == _reads_from(memtable, names, at)


def test_small_flush_is_not_split(open_engine, monkeypatch):
    monkeypatch.setattr(flush_module, "SPLIT_MIN_VERSIONS", 1000)
    e = open_engine()
    _split_workload(e)
    calls = _spy_flushes(e)
    e.flush()
    assert calls == [(180, True)]


def test_crash_after_the_background_half_recovers_the_same_data(open_engine, monkeypatch, tmp_path):
    """Stop (close without finishing) right after the background flush started: the log
    still covers every version, so the reopened shard reads the same and its own flush
    writes exactly keycodec's rows over the half already in an SST file."""
    monkeypatch.setattr(flush_module, "SPLIT_MIN_VERSIONS", 100)
    e = open_engine()
    names = _split_workload(e)
    memtable = {k: list(chain) for k, chain in e.active.items()}
    before = [e.read(names, at) for at in (1, 2, 3)]
    assert before == [_reads_from(memtable, names, at) for at in (1, 2, 3)]
    e.start_flush()
    job = e.flush_job
    while job._split_at is not None:
        assert not e.flush_step()
    e.close()
    e = open_engine(config=e.config)
    assert e.replayed_records == 3
    assert [e.read(names, at) for at in (1, 2, 3)] == before
    e.flush()
    assert list(e.storage.iterate("data")) == sorted(expected_rows(memtable))
    assert [e.read(names, at) for at in (1, 2, 3)] == before
