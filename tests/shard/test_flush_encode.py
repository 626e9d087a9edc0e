"""The flush's hand-written row encoder builds exactly keycodec's rows, and a flush split
in two (the first half flushed in the background) writes exactly those rows too."""
from collections import OrderedDict

import pytest
from hypothesis import given, strategies as st

import shard.flush as flush_module
from shard.flush import native_encode_rows, python_encode_rows
from shard.keycodec import tag, version_key

# Both encoders must build the same rows: the C one (shard/_rowcodec.c, used by the flush
# when built) and the Python reference. Without a C compiler at install time only the
# Python one exists, and the flush uses it.
ENCODERS = [pytest.param(python_encode_rows, id="python"),
            pytest.param(native_encode_rows, id="native", marks=pytest.mark.skipif(
                native_encode_rows is None, reason="shard._rowcodec not built (no C compiler)"))]

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


@pytest.mark.parametrize("encode_rows", ENCODERS)
@given(memtables)
def test_encode_rows_matches_keycodec(encode_rows, memtable):
    taken, vkeys, values, nbytes = encode_rows(iter(memtable.items()))
    assert taken == len(memtable)
    assert list(zip(vkeys, values)) == expected_rows(memtable)
    assert nbytes == sum(len(k) + len(v) for k, v in expected_rows(memtable))


@pytest.mark.parametrize("encode_rows", ENCODERS)
@given(memtables, st.integers(1, 5), st.data())
def test_chunked_encode_with_cache_and_pruned_chains(encode_rows, memtable, chunk, data):
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
        taken, vkeys, vals, _ = encode_rows(islice(items, chunk), cached)
        seen += keys_in_order[len(seen):len(seen) + taken]
        rows += zip(vkeys, vals)
        if taken < chunk:
            break
    assert seen == keys_in_order
    assert rows == expected_rows(memtable)
    assert cached == {key: memtable[key][-1] for key in cached}


@pytest.mark.parametrize("encode_rows", ENCODERS)
def test_encode_rows_escapes_zero_bytes_and_tags_tombstones(encode_rows):
    taken, vkeys, values, nbytes = encode_rows(iter([(b"a\x00b", [(1, None), (2, b"")])]))
    assert taken == 1 and nbytes == 2 * 14 + 1 + 1
    assert vkeys == [b"a\x00\xffb\x00\x01" + (2**64 - 2).to_bytes(8, "big"),
                     b"a\x00\xffb\x00\x01" + (2**64 - 3).to_bytes(8, "big")]
    assert values == [b"\x00", b"\x01"]


@pytest.mark.parametrize("encode_rows", ENCODERS)
def test_cache_update_keeps_the_lru_order_and_long_keys_work(encode_rows):
    """The row cache is an OrderedDict (LRU): updating a present key must not move it or
    add absent ones. A key longer than the C encoder's stack buffer takes its heap path."""
    long_key = b"\x00k" * 600
    cache = OrderedDict([(b"b", (0, None)), (long_key, (0, None)), (b"a", (0, None))])
    memtable = {b"a": [(3, b"x"), (4, None)], long_key: [(5, b"y")], b"c": [(6, b"z")]}
    taken, vkeys, values, _ = encode_rows(iter(memtable.items()), cache)
    assert taken == 3 and list(zip(vkeys, values)) == expected_rows(memtable)
    assert list(cache.items()) == [(b"b", (0, None)), (long_key, (5, b"y")), (b"a", (4, None))]
    cache.move_to_end(b"b")                                  # the LRU's own operations still work
    assert cache.popitem(last=False) == (long_key, (5, b"y"))
    assert list(cache) == [b"a", b"b"] and cache[b"a"] == (4, None)


@pytest.mark.parametrize("items", [
    [(b"k", [(1, "str value")])],          # a value that is not bytes
    [(b"k", [(-1, b"v")])],                # a ts outside 0..2**64-1
    [(b"k", [(2**64, b"v")])],
    [(b"k", [(1,)])],                      # a version that is not a pair
    [(b"k", "not a list")],
    [("str key", [(1, b"v")])],
    [b"not a pair"],
])
def test_native_encoder_refuses_what_the_engine_never_stores(items):
    """The C encoder raises (it does not crash or write garbage) on input the engine's
    validation keeps out of memtables."""
    if native_encode_rows is None:
        pytest.skip("shard._rowcodec not built (no C compiler)")
    with pytest.raises((TypeError, OverflowError, ValueError)):
        native_encode_rows(iter(items))


def test_the_native_encoder_is_built_where_a_compiler_is_and_the_flush_uses_it():
    """A machine with a C compiler (CI's has gcc) must get the C encoder from the install;
    a silent fallback would only show as a slower flush."""
    import shutil
    import sysconfig
    compiler = shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0])
    if compiler is None:
        pytest.skip("no C compiler here: the Python encoder is the expected one")
    assert native_encode_rows is not None, f"{compiler} exists but shard._rowcodec was not built"
    assert flush_module.encode_rows is native_encode_rows and flush_module.ENCODER == "native"


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
    """[(versions written when called, wait), ...] of the engine's storage.flush calls of
    the data column family (the flush's end also flushes `log` and `meta`, unwaited)."""
    calls = []
    real = e.storage.flush

    def flush(cfs, wait=True):
        if cfs == ("data",):
            calls.append((e.flush_job.ops, wait))
        else:
            assert cfs == ("log", "meta") and wait is False
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
    # 9 rows: the 8-row budget ends with the key that reaches it), then the final one was
    # started the same way, and this blocking flush() waited for it (the worker's steps
    # look at RocksDB's progress instead)
    assert len(calls) == 3 and 90 <= calls[0][0] < 90 + 9 and calls[0][1] is False
    assert calls[1:] == [(180, False), (180, True)]
    for at in (1, 2, 3):
        assert e.read(names, at) == _reads_from(memtable, names, at)


def test_small_flush_is_not_split(open_engine, monkeypatch):
    monkeypatch.setattr(flush_module, "SPLIT_MIN_VERSIONS", 1000)
    e = open_engine()
    _split_workload(e)
    calls = _spy_flushes(e)
    e.flush()
    assert calls == [(180, False), (180, True)]


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
