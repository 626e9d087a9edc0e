from hypothesis import given, strategies as st

from shard import keycodec as kc


@given(st.binary(max_size=20), st.binary(max_size=20))
def test_encoding_preserves_order_and_is_prefix_free(a, b):
    ea, eb = kc.enc(a), kc.enc(b)
    assert (a < b) == (ea < eb)
    if a != b:
        assert not ea.startswith(eb) and not eb.startswith(ea)
    assert kc.dec(ea) == a


@given(st.binary(max_size=20), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_version_keys_sort_newest_first_and_roundtrip(key, t1, t2):
    k1, k2 = kc.version_key(key, t1), kc.version_key(key, t2)
    assert (t1 > t2) == (k1 < k2)
    assert kc.split_version_key(k1) == (key, t1)


def test_versions_of_one_key_sort_between_neighbouring_keys():
    rows = sorted(kc.version_key(k, ts) for k in (b"a", b"a\x00", b"ab", b"b") for ts in (1, 9))
    assert [kc.split_version_key(r) for r in rows] == [
        (b"a", 9), (b"a", 1), (b"a\x00", 9), (b"a\x00", 1),
        (b"ab", 9), (b"ab", 1), (b"b", 9), (b"b", 1)]


def test_value_tags():
    assert kc.untag(kc.tag(b"")) == b""
    assert kc.untag(kc.tag(b"\x00x")) == b"\x00x"
    assert kc.tag(None) == kc.TOMBSTONE and kc.untag(kc.TOMBSTONE) is None
