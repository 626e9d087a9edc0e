"""The flush's hand-written row encoder builds exactly keycodec's rows."""
from hypothesis import given, strategies as st

from shard.flush import encode_rows
from shard.keycodec import tag, version_key

chains = st.dictionaries(
    st.binary(min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(1, 2**63), st.one_of(st.none(), st.binary(max_size=8))),
             min_size=1, max_size=4),
    max_size=20)


@given(chains)
def test_encode_rows_matches_keycodec(memtable):
    taken, vkeys, values = encode_rows(iter(memtable.items()))
    expected = [(version_key(key, ts), tag(value))
                for key, chain in memtable.items() for ts, value in chain]
    assert taken == len(memtable)
    assert list(zip(vkeys, values)) == expected


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
