"""Request validation of protocol v1: every op accepted, every kind of bad input
answered with the right code, and no input makes decode_request raise anything else."""
import dataclasses
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import protocol
from node.protocol import Limits, ProtocolError, decode_request, encode_error, encode_reply

LIMITS = Limits()
SMALL = Limits(max_key_bytes=8, max_value_bytes=16, max_txn_ops=4, max_txn_bytes=40,
               max_frame_bytes=4096, max_batch_txns=3, max_get_keys=3)


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def decode(obj, limits=LIMITS):
    return decode_request(pack(obj), limits)


def error_of(frame_or_obj, limits=LIMITS):
    frame = frame_or_obj if isinstance(frame_or_obj, bytes) else pack(frame_or_obj)
    with pytest.raises(ProtocolError) as info:
        decode_request(frame, limits)
    return info.value


# --- limits -------------------------------------------------------------------------

def test_limits_from_config_dict_matches_node_toml():
    import tomllib
    from pathlib import Path
    config = tomllib.loads((Path(__file__).parents[2] / "configs" / "node.toml").read_text())
    limits = Limits.from_dict(config["limits"])
    assert limits == Limits()
    assert limits.max_frame_bytes == 16 * 1024 * 1024


@pytest.mark.parametrize("bad", [{"max_key_bytes": 0}, {"max_key_bytes": True},
                                 {"max_key_bytes": "10"}, {"nope": 3},
                                 {"max_txn_bytes": protocol.MAX_LIMIT + 1}, {"max_txn_bytes": 2**63}])
def test_limits_from_dict_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        Limits.from_dict(bad)


def test_the_largest_limits_allowed_still_parse_txns_and_batches():
    """A limit beyond what the parsers hold as a C ssize_t made every txn and batch fail
    `internal` (an audit found it with "unlimited" written as 2**63): the cap keeps every
    allowed value parseable, by the native parser as by the Python one."""
    top = Limits.from_dict({f.name: protocol.MAX_LIMIT for f in dataclasses.fields(Limits)})
    txn = {"op": "txn", "id": 1, "writes": [[b"k", b"v"]]}
    batch = {"op": "batch", "id": 2, "txns": [{"writes": [[b"k", b"v"]]}]}
    assert decode_request(msgpack.packb(txn), top)["writes"] == [(b"k", b"v")]
    assert decode_request(msgpack.packb(batch), top)["txns"][0]["writes"] == [(b"k", b"v")]


# --- every op accepted --------------------------------------------------------------

def test_ping_stats_flush_take_no_fields():
    for op in ("ping", "stats", "flush"):
        assert decode({"op": op, "id": 7}) == {"op": op, "id": 7}


def test_get_normalizes_keys_to_bytes():
    req = decode({"op": "get", "id": "a", "keys": [b"k1", "k2", "é"], "at": 5})
    assert req == {"op": "get", "id": "a", "keys": [b"k1", b"k2", "é".encode()], "at": 5}
    assert decode({"op": "get", "keys": []})["at"] is None


def test_txn_reads_writes_and_deletes():
    req = decode({"op": "txn", "id": 1, "reads": [[b"a", 0], ["b", 12]],
                  "writes": [[b"a", b"v"], ["c", None], ["d", "text"]], "block": 3})
    assert req == {"op": "txn", "id": 1, "reads": [(b"a", 0), (b"b", 12)],
                   "writes": [(b"a", b"v"), (b"c", None), (b"d", b"text")], "block": 3}


def test_txn_reads_optional_and_duplicate_writes_collapse_to_last():
    req = decode({"op": "txn", "writes": [[b"a", b"1"], [b"b", b"2"], [b"a", None]]})
    assert req["reads"] == [] and req["block"] is None
    assert req["writes"] == [(b"a", None), (b"b", b"2")]


def test_txn_with_empty_writes_is_a_read_validation():
    assert decode({"op": "txn", "reads": [[b"a", 1]], "writes": []})["writes"] == []


def test_batch_entries_are_txns():
    req = decode({"op": "batch", "id": None, "txns": [
        {"writes": [[b"a", b"1"]]}, {"reads": [[b"a", 1]], "writes": [], "block": 2}]})
    assert req["txns"] == [{"reads": [], "writes": [(b"a", b"1")], "block": None},
                           {"reads": [(b"a", 1)], "writes": [], "block": 2}]


@pytest.mark.parametrize("limit", [0, 10001, 2**40])
def test_a_scan_limit_out_of_range_names_the_documented_range(limit):
    assert f"limit must be in 1..10000, got {limit}" in error_of({"op": "scan", "limit": limit}).message


def test_scan_defaults_and_fields():
    assert decode({"op": "scan"}) == {"op": "scan", "id": None, "start": None, "end": None,
                                      "prefix": None, "limit": 1000, "at": None}
    req = decode({"op": "scan", "start": "a", "end": b"z", "prefix": b"p", "limit": 10000, "at": 0})
    assert (req["start"], req["end"], req["prefix"], req["limit"], req["at"]) == (
        b"a", b"z", b"p", 10000, 0)
    assert decode({"op": "scan", "start": b"", "prefix": ""})["start"] is None


def test_block_prune_checkpoint():
    assert decode({"op": "block", "height": 0})["height"] == 0
    assert decode({"op": "prune"})["keep_versions"] is None
    assert decode({"op": "prune", "keep_versions": 1})["keep_versions"] == 1
    assert decode({"op": "checkpoint", "action": "create"})["name"] is None
    assert decode({"op": "checkpoint", "action": "create", "name": "cp-1.v2_x"})["name"] == "cp-1.v2_x"
    assert decode({"op": "checkpoint", "action": "list"}) == {
        "op": "checkpoint", "id": None, "action": "list", "name": None}
    assert decode({"op": "checkpoint", "action": "delete", "name": "a" * 64})["name"] == "a" * 64


@pytest.mark.parametrize("rid", [None, True, False, 0, -5, 2**64 - 1, 1.5, "x", b"\x00\xff"])
def test_any_scalar_id_is_echoed(rid):
    assert decode({"op": "ping", "id": rid})["id"] == rid


def test_unknown_fields_are_ignored():
    assert decode({"op": "ping", "future": [1, 2], 5: "int key"}) == {"op": "ping", "id": None}


# --- bad input ------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"id": 1}, "missing op"),
    ({"op": 5, "id": 1}, "op not a string"),
    ({"op": "drop_all", "id": 1}, "unknown op"),
    ({"op": "get", "id": 1}, "missing keys"),
    ({"op": "get", "id": 1, "keys": b"k"}, "keys not an array"),
    ({"op": "get", "id": 1, "keys": [5]}, "key is an int"),
    ({"op": "get", "id": 1, "keys": [[b"k"]]}, "key is an array"),
    ({"op": "get", "id": 1, "keys": [b""]}, "empty key"),
    ({"op": "get", "id": 1, "keys": [""]}, "empty str key"),
    ({"op": "get", "id": 1, "keys": [b"k"], "at": True}, "bool as at"),
    ({"op": "get", "id": 1, "keys": [b"k"], "at": -1}, "negative at"),
    ({"op": "get", "id": 1, "keys": [b"k"], "at": 1.0}, "float at"),
    ({"op": "get", "id": 1, "keys": [b"k"], "at": 2**64 - 1}, "at beyond int64"),
    ({"op": "txn", "id": 1, "reads": [[b"a", 1]]}, "missing writes"),
    ({"op": "txn", "id": 1, "writes": {b"a": b"v"}}, "writes a map"),
    ({"op": "txn", "id": 1, "writes": [[b"a"]]}, "write pair too short"),
    ({"op": "txn", "id": 1, "writes": [[b"a", b"v", b"x"]]}, "write pair too long"),
    ({"op": "txn", "id": 1, "writes": [[b"a", 5]]}, "int value"),
    ({"op": "txn", "id": 1, "writes": [[b"a", True]]}, "bool value"),
    ({"op": "txn", "id": 1, "writes": [[b"", b"v"]]}, "empty write key"),
    ({"op": "txn", "id": 1, "writes": [], "reads": [[b"a", -1]]}, "negative version"),
    ({"op": "txn", "id": 1, "writes": [], "reads": [[b"a", False]]}, "bool version"),
    ({"op": "txn", "id": 1, "writes": [], "reads": [[b"a", None]]}, "nil version"),
    ({"op": "txn", "id": 1, "writes": [], "block": -3}, "negative block"),
    ({"op": "txn", "id": 1, "writes": [], "reads": "x"}, "reads a string"),
    ({"op": "batch", "id": 1}, "missing txns"),
    ({"op": "batch", "id": 1, "txns": [[]]}, "batch entry not a map"),
    ({"op": "batch", "id": 1, "txns": [{"writes": [[b"", b"v"]]}]}, "empty key in batch"),
    ({"op": "scan", "id": 1, "limit": 0}, "zero limit"),
    ({"op": "scan", "id": 1, "limit": 10001}, "limit over max"),
    ({"op": "scan", "id": 1, "limit": True}, "bool limit"),
    ({"op": "scan", "id": 1, "start": 3}, "int start"),
    ({"op": "scan", "id": 1, "end": b""}, "empty end"),
    ({"op": "scan", "id": 1, "at": -1}, "negative at"),
    ({"op": "block", "id": 1}, "missing height"),
    ({"op": "block", "id": 1, "height": "7"}, "str height"),
    ({"op": "block", "id": 1, "height": -1}, "negative height"),
    ({"op": "block", "id": 1, "height": True}, "bool height"),
    ({"op": "prune", "id": 1, "keep_versions": 0}, "keep zero versions"),
    ({"op": "prune", "id": 1, "keep_versions": False}, "bool keep_versions"),
    ({"op": "checkpoint", "id": 1}, "missing action"),
    ({"op": "checkpoint", "id": 1, "action": "restore"}, "unknown action"),
    ({"op": "checkpoint", "id": 1, "action": "delete"}, "delete without name"),
    ({"op": "checkpoint", "id": 1, "action": "create", "name": 5}, "int name"),
    ({"op": "checkpoint", "id": 1, "action": "create", "name": b"bin"}, "bin name"),
]


@pytest.mark.parametrize("obj,why", BAD_REQUESTS, ids=[why for _, why in BAD_REQUESTS])
def test_bad_request_echoes_id(obj, why):
    err = error_of(obj)
    assert err.code == "bad_request", why
    assert err.id == 1 and err.retryable is False
    reply = msgpack.unpackb(err.reply())
    assert reply["id"] == 1 and reply["ok"] is False
    assert reply["error"]["code"] == "bad_request" and reply["error"]["message"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "a..b", "/etc", "a\\b",
                                  "x" * 70, "a" * 65, "-lead", ".hidden", "a b", "é",
                                  "name\n", "a\x00b"])
@pytest.mark.parametrize("action", ["create", "delete"])
def test_bad_checkpoint_names(name, action):
    err = error_of({"op": "checkpoint", "id": 9, "action": action, "name": name})
    assert (err.code, err.id) == ("bad_request", 9)


def test_id_must_be_scalar_and_is_then_echoed_as_null():
    for rid in ([1], {"a": 1}, msgpack.ExtType(5, b"x")):
        err = error_of({"op": "ping", "id": rid})
        assert (err.code, err.id) == ("bad_request", None)


@pytest.mark.parametrize("frame,why", [
    (b"", "empty frame"),
    (b"\xc1", "reserved byte"),
    (b"\x82\xa2op", "truncated map"),
    (pack({"op": "ping"})[:-1], "truncated at the end"),
    (pack({"op": "ping"}) + b"\x00", "trailing data"),
    (b"\xa2\xff\xfe", "invalid utf-8 str"),
    (b"\x81\x91\x01\x01", "array as map key"),
    (b"\xdd\xff\xff\xff\xff", "array declaring 4G elements"),
    (b"\xc6\xff\xff\xff\xff", "bin declaring 4 GiB"),
    (b"\xdb\xff\xff\xff\xff", "str declaring 4 GiB"),
    (b"\xdf\xff\xff\xff\xff", "map declaring 4G entries"),
    (b"\xc9\xff\xff\xff\xff\x05", "ext declaring 4 GiB"),
    (b"\x91" * 100_000 + b"\xc0", "nested 100k deep"),
    (b"\x81\xa1a" * 50_000 + b"\xc0", "maps nested 50k deep"),
])
def test_unparseable_frames_are_bad_request_with_null_id(frame, why):
    err = error_of(frame)
    assert (err.code, err.id) == ("bad_request", None), why
    assert msgpack.unpackb(err.reply())["id"] is None


@pytest.mark.parametrize("obj,why", [
    ([b"op", b"ping"], "array"), (b"ping", "bin"), ("ping", "str"), (None, "nil"), (5, "int"),
])
def test_non_map_request_is_bad_request(obj, why):
    assert error_of(obj).code == "bad_request", why


def test_deep_nesting_inside_a_valid_map_is_rejected_not_crashing():
    deep = b"\x91" * 1000 + b"\xc0"
    frame = b"\x83" + pack("op") + pack("get") + pack("id") + pack(3) + pack("keys") + deep
    err = error_of(frame)
    assert err.code == "bad_request" and err.id == 3


# --- limits -> too_large --------------------------------------------------------------

@pytest.mark.parametrize("obj,why", [
    ({"op": "get", "id": 1, "keys": [b"k" * 9]}, "key over max_key_bytes"),
    ({"op": "get", "id": 1, "keys": ["é" * 5]}, "str key over limit once UTF-8 encoded"),
    ({"op": "get", "id": 1, "keys": [b"a", b"b", b"c", b"d"]}, "too many get keys"),
    ({"op": "txn", "id": 1, "writes": [[b"k", b"v" * 17]]}, "value over max_value_bytes"),
    ({"op": "txn", "id": 1, "writes": [[b"k%d" % i, b"v"] for i in range(5)]}, "too many ops"),
    ({"op": "txn", "id": 1, "reads": [[b"a", 1]] * 3, "writes": [[b"b", b"v"]] * 2}, "reads+writes ops"),
    ({"op": "txn", "id": 1, "writes": [[b"k%d" % i, b"v" * 16] for i in range(3)]}, "txn bytes"),
    ({"op": "batch", "id": 1, "txns": [{"writes": []}] * 4}, "too many batch txns"),
    ({"op": "batch", "id": 1, "txns": [{"writes": [[b"k", b"v" * 17]]}]}, "value in batch"),
    ({"op": "scan", "id": 1, "start": b"s" * 9}, "scan bound over key limit"),
])
def test_oversized_is_too_large(obj, why):
    err = error_of(obj, SMALL)
    assert (err.code, err.id, err.retryable) == ("too_large", 1, False), why


def test_frame_over_max_frame_bytes_is_too_large():
    frame = pack({"op": "ping", "id": 1, "pad": b"x" * 5000})
    err = error_of(frame, SMALL)
    assert err.code == "too_large" and err.id is None
    assert decode_request(frame, Limits())["op"] == "ping"


def test_default_limits_accept_their_maximums():
    req = decode({"op": "txn", "writes": [[b"k" * 10_000, b"v" * 100_000]]})
    assert len(req["writes"][0][1]) == 100_000
    assert error_of({"op": "txn", "id": 1, "writes": [[b"k" * 10_001, b""]]}).code == "too_large"
    assert error_of({"op": "txn", "id": 1, "writes": [[b"k", b"v" * 100_001]]}).code == "too_large"


# --- envelopes ------------------------------------------------------------------------

def test_reply_envelopes_match_protocol():
    assert msgpack.unpackb(encode_reply(4, ts=9)) == {"id": 4, "ok": True, "ts": 9}
    err = msgpack.unpackb(encode_error("x", "conflict", "stale", keys=[b"a"]))
    assert err == {"id": "x", "ok": False, "error": {
        "code": "conflict", "message": "stale", "retryable": True, "keys": [b"a"]}}
    unav = ProtocolError("unavailable", "shard 1 down", id=2, outcome="unknown")
    assert msgpack.unpackb(unav.reply())["error"] == {
        "code": "unavailable", "message": "shard 1 down", "retryable": True, "outcome": "unknown"}
    assert msgpack.unpackb(ProtocolError("internal", "bug", retryable=True).reply())["error"][
        "retryable"] is True


def test_retryable_defaults_per_code():
    assert protocol.RETRYABLE == {"bad_request": False, "too_large": False, "conflict": True,
                                  "too_old": False, "not_found": False, "unavailable": True,
                                  "internal": False}


# --- property: nothing but ProtocolError, ever ---------------------------------------

def _check_never_crashes(frame, limits=SMALL):
    try:
        req = decode_request(frame, limits)
    except ProtocolError as exc:
        assert exc.code in ("bad_request", "too_large"), exc
        msgpack.unpackb(exc.reply())
        return
    assert req["op"] in protocol.OPS


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_other_errors(frame):
    _check_never_crashes(frame)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=12), st.binary(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20)
field_names = st.sampled_from(["op", "id", "keys", "at", "reads", "writes", "block", "txns",
                               "start", "end", "prefix", "limit", "height", "keep_versions",
                               "action", "name"])
ops = st.sampled_from(list(protocol.OPS) + ["nope", ""])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.dictionaries(field_names, values, max_size=6))
def test_random_requests_never_raise_other_errors(op, fields):
    fields["op"] = op
    _check_never_crashes(pack(fields))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, values, max_size=5), st.data())
def test_truncated_and_corrupted_frames_never_raise_other_errors(fields, data):
    frame = pack(fields)
    cut = data.draw(st.integers(0, len(frame)))
    _check_never_crashes(frame[:cut])
    pos = data.draw(st.integers(0, len(frame) - 1))
    byte = data.draw(st.integers(0, 255))
    _check_never_crashes(frame[:pos] + bytes([byte]) + frame[pos + 1:])


def test_huge_declared_length_inside_a_request_does_not_allocate():
    # {"op": "get", "keys": <array32 claiming 2**32-1 entries>}
    frame = b"\x82" + pack("op") + pack("get") + pack("keys") + b"\xdd" + struct.pack(">I", 2**32 - 1)
    assert error_of(frame).code == "bad_request"
