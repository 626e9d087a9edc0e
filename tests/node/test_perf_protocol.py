"""The fast parsers of the hot ops (get, txn, batch) agree with the reference parsers:
whenever a fast parser accepts a request it returns exactly what the reference returns,
and it never accepts a request the reference rejects (so every error keeps its code and
message, which the reference produces on fallback).

The txn and batch fast paths exist twice, in C (node/_txnparse.c, when built) and in
Python (the fallback); every agreement test runs both."""
import shutil
import sysconfig

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import protocol
from node.protocol import Limits, ProtocolError, decode_request

LIMITS = Limits()
SMALL = Limits(max_key_bytes=8, max_value_bytes=16, max_txn_ops=4, max_txn_bytes=40,
               max_frame_bytes=4096, max_batch_txns=3, max_get_keys=3)

# Mostly well-formed pieces with a sprinkling of every kind of wrong type and size.
keys = st.one_of(st.binary(min_size=1, max_size=10), st.just(b""), st.text(max_size=4),
                 st.integers(-1, 3), st.none(), st.lists(st.binary(max_size=2), max_size=2))
ints = st.one_of(st.integers(0, 50), st.integers(-2, -1), st.just(2**63 - 1), st.just(2**63),
                 st.booleans(), st.none(), st.floats(), st.binary(max_size=2))
values = st.one_of(st.binary(max_size=20), st.none(), st.text(max_size=3), st.integers(0, 3))
pairs = lambda second: st.one_of(st.tuples(keys, second).map(list),  # noqa: E731
                                 st.lists(keys, max_size=3), keys)
txn_fields = st.fixed_dictionaries({}, optional={
    "reads": st.one_of(st.lists(pairs(ints), max_size=4), st.none(), st.binary(max_size=2)),
    "writes": st.one_of(st.lists(pairs(values), max_size=4), st.none(), st.integers()),
    "block": ints})


FAST_TXN = [pytest.param(protocol._py_fast_txn, id="python"),
            pytest.param(protocol._native_fast_txn, id="native", marks=pytest.mark.skipif(
                protocol._c_txn_body is None, reason="node._txnparse not built (no C compiler)"))]
FAST_BATCH = [pytest.param(protocol._py_fast_batch, id="python"),
              pytest.param(protocol._native_fast_batch, id="native", marks=pytest.mark.skipif(
                  protocol._c_txn_body is None, reason="node._txnparse not built (no C compiler)"))]


def reference(op, msg, limits):
    try:
        return protocol._PARSERS[op](protocol._Fields(msg), limits)
    except ProtocolError:
        return None


def same(fast, ref):
    assert fast is None or fast == ref


@pytest.mark.parametrize("fast_txn", FAST_TXN)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=txn_fields, limits=st.sampled_from([LIMITS, SMALL]))
def test_fast_txn_agrees_with_reference(fast_txn, msg, limits):
    same(fast_txn(msg, limits), reference("txn", msg, limits))


@pytest.mark.parametrize("fast_batch", FAST_BATCH)
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(txns=st.one_of(st.lists(st.one_of(txn_fields, st.integers(), st.none()), max_size=5),
                      st.none(), st.binary(max_size=3)),
       limits=st.sampled_from([LIMITS, SMALL]))
def test_fast_batch_agrees_with_reference(fast_batch, txns, limits):
    msg = {} if txns is None else {"txns": txns}
    same(fast_batch(msg, limits), reference("batch", msg, limits))


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(keys, max_size=5), st.none(), st.binary(max_size=3)), ints,
       st.sampled_from([LIMITS, SMALL]))
def test_fast_get_agrees_with_reference(keys_in, at, limits):
    msg = {"keys": keys_in, "at": at}
    same(protocol._fast_get(msg, limits), reference("get", msg, limits))


@pytest.mark.parametrize("fast_txn,fast_batch", [
    pytest.param(t.values[0], b.values[0], id=t.id, marks=t.marks) for t, b in zip(FAST_TXN, FAST_BATCH)])
def test_fast_paths_take_the_common_shapes(fast_txn, fast_batch):
    """The bench/client shapes are served by the fast path (not silently by fallback)."""
    txn = {"reads": [[b"a", 3], [b"b", 0]], "writes": [[b"a", b"1"], [b"b", None], [b"a", b"2"]]}
    normal = {"reads": [(b"a", 3), (b"b", 0)], "writes": [(b"a", b"2"), (b"b", None)], "block": None}
    assert fast_txn(txn, LIMITS) == normal
    assert fast_txn({**txn, "block": 2**63 - 1}, LIMITS)["block"] == 2**63 - 1
    assert fast_batch({"txns": [txn, {"writes": []}]}, LIMITS) == {
        "txns": [normal, {"reads": [], "writes": [], "block": None}]}


def test_the_native_parser_is_built_where_a_compiler_is_and_the_router_uses_it():
    """A machine with a C compiler (CI's has gcc) must get the C parser from the install."""
    if shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is None:
        pytest.skip("no C compiler on this machine: the Python fast path is the expected one")
    assert protocol.PARSER == "native"
    assert protocol._FAST_PARSERS["batch"] is protocol._native_fast_batch


def test_fast_get_takes_the_common_shape():
    assert protocol._fast_get({"keys": [b"a", b"b"]}, LIMITS) == {"keys": [b"a", b"b"], "at": None}


@pytest.mark.parametrize("op,fields,code", [
    ("batch", {"txns": [{"writes": [[b"k", b"v"]]}, {"writes": [[b"", b"v"]]}]}, "bad_request"),
    ("batch", {"txns": [{"writes": [[b"k", b"v" * 17]]}]}, "too_large"),
    ("txn", {"writes": [[b"k", b"v"]], "reads": [[b"k", True]]}, "bad_request"),
    ("get", {"keys": [b"a", b"123456789"]}, "too_large"),
])
def test_invalid_hot_requests_keep_the_reference_error(op, fields, code):
    frame = msgpack.packb({"op": op, "id": 9, **fields}, use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        decode_request(frame, SMALL)
    assert info.value.code == code and info.value.id == 9
    with pytest.raises(ProtocolError) as ref:
        protocol._PARSERS[op](protocol._Fields(fields), SMALL)
    assert info.value.message == ref.value.message
