"""Client protocol v1 (../shared/PROTOCOL.md): request parsing and validation, error
codes, reply builders.

`decode_request(frame, limits)` is the only way a client frame enters the node. It
either returns a normalized request (shapes below) or raises `ProtocolError`; it
never raises anything else, whatever the bytes. Everything after it may trust the
types: keys and values are `bytes`, ints are real non-negative ints, lists are lists.

Normalized requests (every one also has "op" and "id"):

    get        {"keys": [bytes], "at": int | None}
    txn        {"reads": [(bytes, int)], "writes": [(bytes, bytes | None)], "block": int | None}
    batch      {"txns": [{"reads", "writes", "block"}, ...]}
    scan       {"start": bytes | None, "end": bytes | None, "prefix": bytes | None,
                "limit": int, "at": int | None}
    block      {"height": int}
    flush      {}
    prune      {"keep_versions": int | None}
    checkpoint {"action": "create" | "list" | "delete", "name": str | None}
    ping       {}
    stats      {}

Choices the protocol text leaves open, made here once:
- An optional field given as nil is the same as an absent one. Unknown fields are
  ignored (the protocol may grow fields).
- A txn's writes to the same key collapse to the last one (in first-seen order), so
  the engine never sees two versions of one key at one commit_ts.
- Scan bounds: an empty `start` or `prefix` means "no bound" (normalized to None); an
  empty `end` is an empty key and answers bad_request.
- ints are bounded to 0 .. 2**63-1 so they fit every internal encoding.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# Error codes and whether a client may retry each (PROTOCOL.md "Envelope").
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
CONFLICT = "conflict"
TOO_OLD = "too_old"
NOT_FOUND = "not_found"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

RETRYABLE = {
    BAD_REQUEST: False,
    TOO_LARGE: False,
    CONFLICT: True,
    TOO_OLD: False,
    NOT_FOUND: False,
    UNAVAILABLE: True,
    INTERNAL: False,
}
ERROR_CODES = tuple(RETRYABLE)

# `unavailable` for a txn reports what happened to it.
OUTCOME_ABORTED = "aborted"
OUTCOME_UNKNOWN = "unknown"

OPS = ("ping", "get", "txn", "batch", "scan", "block", "flush", "prune", "checkpoint", "stats")
CHECKPOINT_ACTIONS = ("create", "list", "delete")

SCAN_DEFAULT_LIMIT = 1000
SCAN_MAX_LIMIT = 10000
MAX_INT = 2**63 - 1

CHECKPOINT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# The largest value a [limits] key may take: the parsers hold sizes as C ssize_t (a larger
# one made every txn and batch fail `internal`), ZeroMQ's frame cap is 4x max_frame_bytes
# in an int64, and a frame is held in memory whole, several times over, anyway.
MAX_LIMIT = 1 << 30


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request size limits ([limits] in configs/node.toml)."""

    max_key_bytes: int = 10_000
    max_value_bytes: int = 100_000
    max_txn_ops: int = 10_000
    max_txn_bytes: int = 10_000_000
    max_frame_bytes: int = 16 * 1024 * 1024
    max_batch_txns: int = 10_000
    max_get_keys: int = 10_000

    @classmethod
    def from_dict(cls, d: dict | None) -> "Limits":
        """Build from the [limits] table; missing keys keep their defaults."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"limits: unknown key(s) {', '.join(unknown)}")
        for name, value in d.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LIMIT:
                raise ValueError(f"limits.{name}: must be an integer between 1 and {MAX_LIMIT}, got {value!r}")
        return cls(**d)


class ProtocolError(Exception):
    """A request failed with a protocol error code; `.reply()` is the wire answer."""

    def __init__(self, code: str, message: str, retryable: bool | None = None,
                 id: Any = None, **extra: Any):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = RETRYABLE.get(code, False) if retryable is None else bool(retryable)
        self.id = id
        self.extra = extra

    def error_dict(self) -> dict:
        return {"code": self.code, "message": self.message,
                "retryable": self.retryable, **self.extra}

    def reply(self) -> bytes:
        return encode_error(self.id, self.code, self.message, self.retryable, **self.extra)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_reply(id: Any, **fields: Any) -> bytes:
    """Success envelope: {"id", "ok": true, ...fields}."""
    return packb({"id": id, "ok": True, **fields})


def encode_error(id: Any, code: str, message: str, retryable: bool | None = None,
                 **extra: Any) -> bytes:
    """Failure envelope: {"id", "ok": false, "error": {"code", "message", "retryable", ...}}."""
    if retryable is None:
        retryable = RETRYABLE.get(code, False)
    error = {"code": code, "message": message, "retryable": bool(retryable), **extra}
    return packb({"id": id, "ok": False, "error": error})


def unpack_frame(frame: bytes, max_frame_bytes: int) -> Any:
    """msgpack.unpackb with every declared length bounded by the frame itself, so a
    header claiming 4 GiB cannot allocate; any failure is a bad_request."""
    bound = min(len(frame), max_frame_bytes)
    try:
        return msgpack.unpackb(
            frame, raw=False, strict_map_key=False, use_list=True,
            max_str_len=bound, max_bin_len=bound, max_array_len=bound,
            max_map_len=bound // 2, max_ext_len=bound)
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, "frame nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's fault
        kind = type(exc).__name__
        raise ProtocolError(BAD_REQUEST, f"frame is not one msgpack value ({kind})") from None


def decode_request(frame: bytes, limits: Limits) -> dict:
    """Parse and validate one client frame; return the normalized request or raise
    ProtocolError (carrying the request's id once it is known)."""
    try:
        return _decode(frame, limits)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - a validator bug must not kill the router
        raise ProtocolError(INTERNAL, f"request validation failed: {type(exc).__name__}: {exc}") from None


def _decode(frame: bytes, limits: Limits) -> dict:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_REQUEST, "frame must be bytes")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(TOO_LARGE, f"frame of {len(frame)} bytes exceeds max_frame_bytes "
                                       f"{limits.max_frame_bytes}")
    msg = unpack_frame(bytes(frame), limits.max_frame_bytes)
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, "request must be a msgpack map")
    rid = msg.get("id")
    if not _is_scalar(rid):
        raise ProtocolError(BAD_REQUEST, "id must be a scalar (nil, bool, int, float, str or bin)")
    op = msg.get("op")
    fast = _FAST_PARSERS.get(op) if type(op) is str else None
    if fast is not None:
        request = fast(msg, limits)
        if request is not None:
            request["op"] = op
            request["id"] = rid
            return request
    try:
        if not isinstance(op, str):
            raise ProtocolError(BAD_REQUEST, "op must be a string")
        parse = _PARSERS.get(op)
        if parse is None:
            raise ProtocolError(BAD_REQUEST, f"unknown op {op[:64]!r}")
        request = parse(_Fields(msg), limits)
    except ProtocolError as exc:
        exc.id = rid
        raise
    request["op"] = op
    request["id"] = rid
    return request


# -- fast paths for the hot ops (get, txn, batch) -------------------------------------
# Each returns the normalized request when the input is fully valid, else None; on None
# the reference parser below runs and raises the exact error (code, message, order of
# checks). So a fast path only has to accept a subset of valid inputs with the same
# output: it takes exact msgpack types (bytes keys and values; a str key falls back) and
# checks with plain loops, no per-item calls or exceptions.

def _py_fast_txn_body(entry: dict, limits: Limits) -> dict | None:
    writes_in = entry.get("writes")
    reads_in = entry.get("reads")
    block = entry.get("block")
    if type(writes_in) is not list:
        return None
    if reads_in is None:
        reads_in = ()
    elif type(reads_in) is not list:
        return None
    if block is not None and (type(block) is not int or block < 0 or block > MAX_INT):
        return None
    if len(reads_in) + len(writes_in) > limits.max_txn_ops:
        return None
    max_key = limits.max_key_bytes
    max_value = limits.max_value_bytes
    total = 0
    reads = []
    for item in reads_in:
        if type(item) is not list or len(item) != 2:
            return None
        key, version = item
        if type(key) is not bytes or type(version) is not int:
            return None
        n = len(key)
        if not n or n > max_key or version < 0 or version > MAX_INT:
            return None
        total += n
        reads.append((key, version))
    writes = {}
    for item in writes_in:
        if type(item) is not list or len(item) != 2:
            return None
        key, value = item
        if type(key) is not bytes:
            return None
        n = len(key)
        if not n or n > max_key:
            return None
        if value is not None:
            if type(value) is not bytes or len(value) > max_value:
                return None
            n += len(value)
        total += n
        writes[key] = value
    if total > limits.max_txn_bytes:
        return None
    return {"reads": reads, "writes": list(writes.items()), "block": block}


def _py_fast_txn(msg: dict, limits: Limits) -> dict | None:
    return _py_fast_txn_body(msg, limits)


def _py_fast_batch(msg: dict, limits: Limits) -> dict | None:
    txns_in = msg.get("txns")
    if type(txns_in) is not list or len(txns_in) > limits.max_batch_txns:
        return None
    txns = []
    body = _py_fast_txn_body
    for entry in txns_in:
        if type(entry) is not dict:
            return None
        t = body(entry, limits)
        if t is None:
            return None
        txns.append(t)
    return {"txns": txns}


# The same two fast paths in C (node/_txnparse.c), built by the install where a compiler
# is; the Python ones above stay as the fallback and as the reference the tests hold the
# C ones to. PARSER says which one the router runs.
try:
    from node._txnparse import batch as _c_batch, txn_body as _c_txn_body
except ImportError:  # built without a C compiler
    _c_batch = _c_txn_body = None


def _native_fast_txn(msg: dict, limits: Limits) -> dict | None:
    return _c_txn_body(msg, limits.max_key_bytes, limits.max_value_bytes, limits.max_txn_ops,
                       limits.max_txn_bytes)


def _native_fast_batch(msg: dict, limits: Limits) -> dict | None:
    return _c_batch(msg.get("txns"), limits.max_batch_txns, limits.max_key_bytes,
                    limits.max_value_bytes, limits.max_txn_ops, limits.max_txn_bytes)


PARSER = "native" if _c_txn_body is not None else "python"
_fast_txn = _native_fast_txn if _c_txn_body is not None else _py_fast_txn
_fast_batch = _native_fast_batch if _c_txn_body is not None else _py_fast_batch


def _fast_get(msg: dict, limits: Limits) -> dict | None:
    keys = msg.get("keys")
    at = msg.get("at")
    if type(keys) is not list or len(keys) > limits.max_get_keys:
        return None
    if at is not None and (type(at) is not int or at < 0 or at > MAX_INT):
        return None
    max_key = limits.max_key_bytes
    for key in keys:
        if type(key) is not bytes or not key or len(key) > max_key:
            return None
    return {"keys": keys, "at": at}


_FAST_PARSERS = {"get": _fast_get, "txn": _fast_txn, "batch": _fast_batch}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes))


class _Fields:
    """Typed access to a request map; every failure names the field."""

    def __init__(self, msg: dict):
        self.msg = msg

    def get(self, name: str) -> Any:
        return self.msg.get(name)

    def require(self, name: str) -> Any:
        value = self.msg.get(name)
        if value is None:
            raise ProtocolError(BAD_REQUEST, f"missing field {name!r}")
        return value

    def list(self, name: str, required: bool = True) -> list | None:
        value = self.require(name) if required else self.msg.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise ProtocolError(BAD_REQUEST, f"{name} must be an array")
        return value

    def int(self, name: str, required: bool = False, minimum: int = 0) -> int | None:
        value = self.require(name) if required else self.msg.get(name)
        if value is None:
            return None
        return _int(value, name, minimum)


def _int(value: Any, where: str, minimum: int = 0, maximum: int = MAX_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(BAD_REQUEST, f"{where} must be an integer")
    if value < minimum or value > maximum:
        raise ProtocolError(BAD_REQUEST, f"{where} must be in {minimum}..{maximum}, got {value}")
    return value


def _bytes(value: Any, where: str, what: str) -> bytes:
    """bin, or str read as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates cannot come from msgpack, but be safe
            raise ProtocolError(BAD_REQUEST, f"{where} is not valid UTF-8") from None
    raise ProtocolError(BAD_REQUEST, f"{where} must be a {what} (bin or str)")


def _key(value: Any, where: str, limits: Limits) -> bytes:
    key = _bytes(value, where, "key")
    if not key:
        raise ProtocolError(BAD_REQUEST, f"{where} is an empty key")
    if len(key) > limits.max_key_bytes:
        raise ProtocolError(TOO_LARGE, f"{where}: key of {len(key)} bytes exceeds "
                                       f"max_key_bytes {limits.max_key_bytes}")
    return key


def _value(value: Any, where: str, limits: Limits) -> bytes | None:
    if value is None:
        return None
    data = _bytes(value, where, "value")
    if len(data) > limits.max_value_bytes:
        raise ProtocolError(TOO_LARGE, f"{where}: value of {len(data)} bytes exceeds "
                                       f"max_value_bytes {limits.max_value_bytes}")
    return data


def _pair(item: Any, where: str) -> list:
    if not isinstance(item, list) or len(item) != 2:
        raise ProtocolError(BAD_REQUEST, f"{where} must be a 2-element array")
    return item


def _parse_txn_body(fields: _Fields, limits: Limits, where: str = "") -> dict:
    reads_in = fields.list("reads", required=False) or []
    writes_in = fields.list("writes")
    block = fields.int("block")
    if len(reads_in) + len(writes_in) > limits.max_txn_ops:
        raise ProtocolError(TOO_LARGE, f"{where}transaction has {len(reads_in) + len(writes_in)} "
                                       f"reads+writes, over max_txn_ops {limits.max_txn_ops}")
    total = 0
    reads = []
    for i, item in enumerate(reads_in):
        key, version = _pair(item, f"{where}reads[{i}]")
        key = _key(key, f"{where}reads[{i}][0]", limits)
        version = _int(version, f"{where}reads[{i}][1] (version)")
        total += len(key)
        reads.append((key, version))
    writes: dict[bytes, bytes | None] = {}
    for i, item in enumerate(writes_in):
        key, value = _pair(item, f"{where}writes[{i}]")
        key = _key(key, f"{where}writes[{i}][0]", limits)
        value = _value(value, f"{where}writes[{i}][1]", limits)
        total += len(key) + (len(value) if value is not None else 0)
        writes[key] = value
    if total > limits.max_txn_bytes:
        raise ProtocolError(TOO_LARGE, f"{where}transaction has {total} bytes of keys+values, "
                                       f"over max_txn_bytes {limits.max_txn_bytes}")
    return {"reads": reads, "writes": list(writes.items()), "block": block}


def _parse_get(fields: _Fields, limits: Limits) -> dict:
    keys_in = fields.list("keys")
    if len(keys_in) > limits.max_get_keys:
        raise ProtocolError(TOO_LARGE, f"get of {len(keys_in)} keys exceeds max_get_keys "
                                       f"{limits.max_get_keys}")
    keys = [_key(k, f"keys[{i}]", limits) for i, k in enumerate(keys_in)]
    return {"keys": keys, "at": fields.int("at")}


def _parse_txn(fields: _Fields, limits: Limits) -> dict:
    return _parse_txn_body(fields, limits)


def _parse_batch(fields: _Fields, limits: Limits) -> dict:
    txns_in = fields.list("txns")
    if len(txns_in) > limits.max_batch_txns:
        raise ProtocolError(TOO_LARGE, f"batch of {len(txns_in)} txns exceeds max_batch_txns "
                                       f"{limits.max_batch_txns}")
    txns = []
    for i, entry in enumerate(txns_in):
        if not isinstance(entry, dict):
            raise ProtocolError(BAD_REQUEST, f"txns[{i}] must be a map")
        txns.append(_parse_txn_body(_Fields(entry), limits, where=f"txns[{i}]."))
    return {"txns": txns}


def _scan_bound(fields: _Fields, name: str, limits: Limits) -> bytes | None:
    value = fields.get(name)
    if value is None:
        return None
    if name in ("start", "prefix") and value in (b"", ""):
        return None
    return _key(value, name, limits)


def _parse_scan(fields: _Fields, limits: Limits) -> dict:
    limit = fields.get("limit")
    limit = SCAN_DEFAULT_LIMIT if limit is None else _int(limit, "limit", 1, SCAN_MAX_LIMIT)
    return {"start": _scan_bound(fields, "start", limits),
            "end": _scan_bound(fields, "end", limits),
            "prefix": _scan_bound(fields, "prefix", limits),
            "limit": limit, "at": fields.int("at")}


def _parse_block(fields: _Fields, limits: Limits) -> dict:
    return {"height": fields.int("height", required=True)}


def _parse_prune(fields: _Fields, limits: Limits) -> dict:
    return {"keep_versions": fields.int("keep_versions", minimum=1)}


def _parse_checkpoint(fields: _Fields, limits: Limits) -> dict:
    action = fields.require("action")
    if action not in CHECKPOINT_ACTIONS:
        raise ProtocolError(BAD_REQUEST, f"action must be one of {', '.join(CHECKPOINT_ACTIONS)}")
    name = fields.get("name")
    if action == "list":
        return {"action": action, "name": None}
    if name is None:
        if action == "delete":
            raise ProtocolError(BAD_REQUEST, "checkpoint delete needs a name")
        return {"action": action, "name": None}
    return {"action": action, "name": check_checkpoint_name(name)}


def check_checkpoint_name(name: Any) -> str:
    """A checkpoint name is one safe path component: ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$,
    never containing "..". Raises bad_request otherwise."""
    if not isinstance(name, str):
        raise ProtocolError(BAD_REQUEST, "checkpoint name must be a string")
    if not CHECKPOINT_NAME_RE.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise ProtocolError(BAD_REQUEST, f"bad checkpoint name {shown!r}: use 1-64 of "
                                         "A-Z a-z 0-9 . _ - , starting with a letter or digit, no '..'")
    return name


def _parse_empty(fields: _Fields, limits: Limits) -> dict:
    return {}


_PARSERS = {
    "ping": _parse_empty,
    "get": _parse_get,
    "txn": _parse_txn,
    "batch": _parse_batch,
    "scan": _parse_scan,
    "block": _parse_block,
    "flush": _parse_empty,
    "prune": _parse_prune,
    "checkpoint": _parse_checkpoint,
    "stats": _parse_empty,
}
assert set(_PARSERS) == set(OPS)
