"""Key routing (node/routing.py): the C helpers (node/_routing.c, when built) return exactly
what the Python reference returns, for whole batches and gets; the reference itself is
checked against the definition (shard = zlib.crc32(key) % shards, parts in key order)."""
import shutil
import sysconfig
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import routing

native = pytest.mark.skipif(routing.native_route_batch is None,
                            reason="node._routing not built (no C compiler)")

keys = st.binary(min_size=1, max_size=12)
key_pool = st.lists(keys, min_size=1, max_size=12, unique=True)
shard_counts = st.one_of(st.integers(1, 8), st.just(2**40))   # 2**40: the crc32 itself


@st.composite
def batches(draw):
    """Entries over a small pool of keys (so keys repeat within and across entries), as
    the parser normalizes them: reads [(key, version)], writes [(key, value | None)]."""
    pool = draw(key_pool)
    pick = st.sampled_from(pool)
    entry = st.fixed_dictionaries({
        "reads": st.lists(st.tuples(pick, st.integers(0, 9)), max_size=3),
        "writes": st.lists(st.tuples(pick, st.one_of(st.none(), st.binary(max_size=3))), max_size=3)})
    return draw(st.lists(entry, max_size=8))


@native
@settings(max_examples=600)
@given(batches(), shard_counts)
def test_native_route_batch_matches_the_reference(txns, shards):
    expected = routing.py_route_batch(txns, shards)
    got = routing.native_route_batch(txns, shards)
    assert got == expected
    if got is not None:   # same parts in the same order (start_2pc sorts, but keep it exact)
        assert [list(r) if isinstance(r, dict) else r for r in got] == \
               [list(r) if isinstance(r, dict) else r for r in expected]


@native
@settings(max_examples=400)
@given(st.lists(keys, max_size=30), shard_counts)
def test_native_group_keys_matches_the_reference(ks, shards):
    expected = routing.py_group_keys(ks, shards)
    got = routing.native_group_keys(ks, shards)
    assert got == expected and list(got) == list(expected)


@settings(max_examples=300)
@given(batches(), st.integers(1, 5))
def test_the_reference_routes_by_crc32_and_refuses_batches_sharing_a_key(txns, shards):
    routes = routing.py_route_batch(txns, shards)
    owners = {}
    for i, t in enumerate(txns):
        for k, _ in t["reads"] + t["writes"]:
            owners.setdefault(k, set()).add(i)
    if any(len(o) > 1 for o in owners.values()):
        assert routes is None
        return
    for t, route in zip(txns, routes):
        where = {zlib.crc32(k) % shards for k, _ in t["reads"] + t["writes"]}
        if len(where) <= 1:
            assert route == (where.pop() if where else -1)
        else:
            assert set(route) == where
            for s, (reads, writes) in route.items():
                assert reads == [kv for kv in t["reads"] if zlib.crc32(kv[0]) % shards == s]
                assert writes == [kv for kv in t["writes"] if zlib.crc32(kv[0]) % shards == s]


def test_group_keys_keeps_each_shards_keys_and_their_positions():
    ks = [b"acct%05d" % i for i in range(50)]
    groups = routing.group_keys(ks, 3)
    for s, (idx, shard_keys) in groups.items():
        assert shard_keys == [ks[i] for i in idx]
        assert all(zlib.crc32(k) % 3 == s for k in shard_keys)
    assert sorted(i for idx, _ in groups.values() for i in idx) == list(range(50))


@pytest.mark.parametrize("impl", [
    pytest.param((routing.py_route_batch, routing.py_group_keys), id="python"),
    pytest.param((routing.native_route_batch, routing.native_group_keys), id="native", marks=native)])
def test_bad_arguments_raise_instead_of_routing_garbage(impl):
    route_batch, group_keys = impl
    for shards in (0, -1):
        with pytest.raises(ValueError):
            route_batch([], shards)
        with pytest.raises(ValueError):
            group_keys([b"k"], shards)
    bad_batches = [[{"reads": [("k", 1)], "writes": []}],         # str key
                   [{"reads": [], "writes": [(b"k", b"v", 3)]}],  # not a pair
                   [{"reads": [], "writes": [(5, b"v")]}]]        # int key
    for txns in bad_batches:
        with pytest.raises((TypeError, ValueError)):
            route_batch(txns, 2)
    with pytest.raises(TypeError):
        group_keys([b"k", "k"], 2)


def test_the_native_routing_is_built_where_a_compiler_is_and_the_router_uses_it():
    """A machine with a C compiler (CI's has gcc) must get the C routing from the install."""
    if shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is None:
        pytest.skip("no C compiler on this machine: the Python routing is the expected one")
    from node import coordinator, router
    assert routing.ROUTING == "native"
    assert coordinator.route_batch is routing.native_route_batch
    assert coordinator.first_locked is routing.native_first_locked
    assert coordinator.lock_parts is routing.native_lock_parts
    assert coordinator.unlock_parts is routing.native_unlock_parts
    assert router.group_keys is routing.native_group_keys


@native
def test_native_routing_holds_no_reference_after_it_returns():
    """A C helper that kept a reference per call would leak the router's memory a batch at
    a time: after the results are dropped, every key and pair is back to its refcount."""
    import sys
    ks = [b"k%03d" % i for i in range(40)]
    txns = [{"reads": [(ks[2 * i], 1)], "writes": [(ks[2 * i], b"v"), (ks[2 * i + 1], None)]}
            for i in range(20)]
    shared = txns + [{"reads": [(ks[0], 1)], "writes": []}]
    objects = ks + [p for t in txns for p in t["reads"] + t["writes"]]
    before = [sys.getrefcount(o) for o in objects]
    for _ in range(200):
        routing.native_route_batch(txns, 3)
        routing.native_route_batch(shared, 3)          # stops early: some key in two entries
        routing.native_group_keys(ks, 3)
        with pytest.raises(TypeError):
            routing.native_route_batch(txns + [{"reads": [("k", 1)], "writes": []}], 3)
    assert [sys.getrefcount(o) for o in objects] == before


# -- the keys of undecided 2PC txns (first_locked, lock_parts, unlock_parts)

@native
@settings(max_examples=400)
@given(batches(), st.lists(keys, max_size=6), st.integers(-1, 9))
def test_native_first_locked_matches_the_reference(txns, held, start):
    locked = dict.fromkeys(held, "txn")
    assert routing.native_first_locked(txns, start, locked) == routing.py_first_locked(txns, start, locked)


@native
@settings(max_examples=300)
@given(batches(), st.lists(keys, max_size=4))
def test_native_lock_and_unlock_parts_match_the_reference(txns, others):
    """Lock each multi-shard entry's parts beside keys other txns hold, then unlock them:
    the same dicts as the reference's at every step; the written keys go to `written`
    too; the other txns' keys stay."""
    routes = routing.py_route_batch(txns, 3) or []
    for parts in [r for r in routes if isinstance(r, dict)]:
        part_keys = {k for reads, writes in parts.values() for k, _ in reads + writes}
        write_keys = {k for _, writes in parts.values() for k, _ in writes}
        others = [k for k in others if k not in part_keys]   # no key is held by two txns
        native, reference = dict.fromkeys(others, "other"), dict.fromkeys(others, "other")
        native_w, reference_w = dict.fromkeys(others, "other"), dict.fromkeys(others, "other")
        routing.native_lock_parts(native, native_w, parts, "txn")
        routing.py_lock_parts(reference, reference_w, parts, "txn")
        assert (native, native_w) == (reference, reference_w)
        assert {k for k, v in reference.items() if v == "txn"} == part_keys
        assert {k for k, v in reference_w.items() if v == "txn"} == write_keys
        routing.native_unlock_parts(native, native_w, parts)
        routing.py_unlock_parts(reference, reference_w, parts)
        assert (native, native_w) == (reference, reference_w)
        assert reference == reference_w == dict.fromkeys(others, "other")


@native
def test_native_key_locks_hold_no_reference_after_they_return():
    import sys
    ks = [b"k%03d" % i for i in range(8)]
    parts = {0: ([(ks[0], 1)], [(ks[0], b"v"), (ks[1], None)]), 1: ([], [(ks[2], b"w")])}
    txns = [{"reads": [(ks[5], 1)], "writes": [(ks[6], b"x")]}, {"reads": [], "writes": [(ks[2], b"y")]}]
    txn = object()
    locked, written = {}, {}
    objects = ks + [txn]
    before = [sys.getrefcount(o) for o in objects]
    for _ in range(200):
        routing.native_lock_parts(locked, written, parts, txn)
        assert routing.native_first_locked(txns, 0, locked) == 1
        routing.native_unlock_parts(locked, written, parts)
        with pytest.raises(TypeError):
            routing.native_lock_parts(locked, written, {0: ([("k", 1)], [])}, txn)
    assert locked == {} and written == {}
    assert [sys.getrefcount(o) for o in objects] == before
