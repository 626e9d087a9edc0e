"""Python client for a shardkv node (protocol v1, ../shared/PROTOCOL.md).

    from node.client import Client
    with Client("tcp://127.0.0.1:7450") as kv:
        kv.put(b"alice", b"100")
        print(kv.get([b"alice"]).value)            # b"100"
        with kv.transaction() as tx:                # read versions are checked at commit
            tx.put(b"bob", tx.get(b"alice") or b"0")

One `Client` owns one DEALER socket and is not thread-safe (use one per thread).
Requests carry increasing integer ids; replies are paired by id, so `send`/`recv` and
`pipeline` can keep many requests in flight. Every error reply raises the
`ShardKVError` subclass for its code; a reply that does not come within `timeout`
raises `Timeout` (an `Unavailable` and a `TimeoutError`, outcome "unknown") and the
socket is replaced, so a late reply can never be mistaken for a later request's.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

import msgpack
import zmq

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7450"
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
# Replies can be far larger than requests (a 10,000-key scan of 100 KB values); this
# only guards the client's memory against a broken or hostile server.
DEFAULT_MAX_REPLY_BYTES = 2 * 1024 * 1024 * 1024

T = TypeVar("T")
Key = bytes | str


# --- errors ---------------------------------------------------------------------------

class ShardKVError(Exception):
    """An error reply: `code`, `message`, `retryable` and any extra `details`."""

    code = "internal"

    def __init__(self, message: str, retryable: bool | None = None, details: dict | None = None,
                 code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.retryable = type(self).default_retryable if retryable is None else retryable
        self.details = details or {}

    default_retryable = False

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(ShardKVError):
    code = "bad_request"


class TooLarge(ShardKVError):
    code = "too_large"


class Conflict(ShardKVError):
    code = "conflict"
    default_retryable = True

    @property
    def keys(self) -> list[bytes]:
        return list(self.details.get("keys") or [])


class TooOld(ShardKVError):
    code = "too_old"


class NotFound(ShardKVError):
    code = "not_found"


class Unavailable(ShardKVError):
    code = "unavailable"
    default_retryable = True

    @property
    def outcome(self) -> str | None:
        """For a txn: "aborted" (had no effect) or "unknown" (may have committed)."""
        return self.details.get("outcome")


class Timeout(Unavailable, TimeoutError):
    """No reply within the client's timeout: the request may or may not have run."""

    def __init__(self, message: str):
        super().__init__(message, True, {"outcome": "unknown"})


class Internal(ShardKVError):
    code = "internal"


ERRORS: dict[str, type[ShardKVError]] = {
    cls.code: cls for cls in (BadRequest, TooLarge, Conflict, TooOld, NotFound, Unavailable, Internal)
}


def error_from_reply(error: Any) -> ShardKVError:
    """The exception for a reply's `error` map (an unknown code becomes the base class)."""
    if not isinstance(error, dict):
        return Internal(f"malformed error reply: {error!r}")
    code = str(error.get("code", "internal"))
    details = {k: v for k, v in error.items() if k not in ("code", "message", "retryable")}
    retryable = error.get("retryable")
    retryable = bool(retryable) if isinstance(retryable, bool) else None
    cls = ERRORS.get(code)
    if cls is None:
        return ShardKVError(str(error.get("message", "")), retryable, details, code=code)
    return cls(str(error.get("message", "")), retryable, details)


# --- results --------------------------------------------------------------------------

@dataclass
class GetResult:
    """Values and versions of `keys`, all read at snapshot `ts` (version 0 = absent)."""

    ts: int
    keys: list[bytes]
    values: list[bytes | None]
    versions: list[int]

    @property
    def value(self) -> bytes | None:
        """The value of the only (first) key."""
        return self.values[0]

    @property
    def version(self) -> int:
        return self.versions[0]

    def as_dict(self) -> dict[bytes, bytes | None]:
        return dict(zip(self.keys, self.values))

    def __iter__(self) -> Iterator[tuple[bytes, bytes | None, int]]:
        return iter(zip(self.keys, self.values, self.versions))


@dataclass
class ScanResult:
    ts: int
    items: list[tuple[bytes, bytes, int]]      # (key, value, version), bytewise key order
    more: bool


# --- helpers --------------------------------------------------------------------------

def as_bytes(data: Key) -> bytes:
    """str (UTF-8) or a bytes-like object as bytes. Anything else is a TypeError: bytes(100)
    is 100 zero bytes, so an int key or value would otherwise be stored as NULs."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"keys and values must be bytes or str, got {type(data).__name__}")


def _pairs(items: Any, value: Callable[[Any], Any]) -> list[list]:
    """A mapping or an iterable of pairs -> [[bytes key, value(v)], ...]."""
    if items is None:
        return []
    if isinstance(items, dict):
        items = items.items()
    return [[as_bytes(k), value(v)] for k, v in items]


def _write_value(v: Any) -> bytes | None:
    """A write's value: bytes, or None (a delete). An int or float is a TypeError here,
    as for put(), not a bad_request after a round trip."""
    return None if v is None else as_bytes(v)


def _version(v: Any) -> Any:
    return v            # the node checks versions (an int >= 0)


def retry(fn: Callable[[], T], attempts: int = 5, backoff: float = 0.05,
          max_backoff: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call fn() until it returns, retrying only retryable ShardKVErrors (conflict,
    unavailable, timeout) at most `attempts` times in all, sleeping an exponentially
    growing, fully jittered delay between tries. The last error is raised.

    A txn that timed out or answered unavailable/unknown may have committed: retry only
    work that is safe to repeat (blind puts of the same value, or a transaction whose
    reads make a repeated commit conflict)."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(attempts):
        try:
            return fn()
        except ShardKVError as exc:
            if not exc.retryable or attempt == attempts - 1:
                raise
            delay = min(max_backoff, backoff * (2 ** attempt))
            sleep(random.uniform(delay / 2, delay))
    raise AssertionError("unreachable")


# --- the client -----------------------------------------------------------------------

class Client:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 5.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
                 server_public_key: bytes | None = None, public_key: bytes | None = None,
                 secret_key: bytes | None = None, context: zmq.Context | None = None,
                 busy_poll_us: int = 0):
        """`server_public_key` (z85) turns on CURVE; the client key pair defaults to a
        fresh one (which the node accepts only if it allows any client).
        `busy_poll_us`: wait for each reply that long without sleeping (polling, and
        yielding the CPU between polls) before blocking. A reply then skips this
        process's wake-up, tens of microseconds on a VM, for up to that much CPU per
        request; worth it for a client that sends one txn at a time and waits."""
        self.endpoint = endpoint
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e9:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")   # inf, nan too
        self.timeout = timeout
        if type(busy_poll_us) is not int or busy_poll_us < 0:
            raise ValueError(f"busy_poll_us must be an int >= 0, got {busy_poll_us!r}")
        self.busy_poll = busy_poll_us / 1e6
        self.max_frame_bytes = max_frame_bytes
        self.max_reply_bytes = max_reply_bytes
        self._curve = None
        if server_public_key is not None:
            if public_key is None or secret_key is None:
                public_key, secret_key = zmq.curve_keypair()
            self._curve = (server_public_key, public_key, secret_key)
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._pending: set[int] = set()
        self._inbox: dict[Any, dict] = {}
        self._sock: zmq.Socket | None = None
        self._connect()

    # lifecycle
    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_reply_bytes)
        if self._curve is not None:
            server, public, secret = self._curve
            sock.curve_serverkey = server
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(self.endpoint)
        self._sock = sock

    def reset(self) -> None:
        """Drop the socket and everything in flight; later replies to it are lost."""
        if self._sock is not None:
            self._sock.close(linger=0)
        self._pending.clear()
        self._inbox.clear()
        self._connect()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # raw requests
    def send(self, op: str, **fields: Any) -> int:
        """Send one request without waiting; returns its id for recv()."""
        if self._sock is None:
            raise RuntimeError("client is closed")
        rid = next(self._ids)
        frame = msgpack.packb({"op": op, "id": rid, **fields}, use_bin_type=True)
        if len(frame) > self.max_frame_bytes:
            raise TooLarge(f"request frame of {len(frame)} bytes exceeds max_frame_bytes "
                           f"{self.max_frame_bytes}")
        self._sock.send(frame)
        self._pending.add(rid)
        return rid

    def recv(self, rid: int, timeout: float | None = None) -> dict:
        """The reply envelope for request `rid` (ok or not). Replies for other pending
        ids that arrive meanwhile are kept for their own recv()."""
        if rid in self._inbox:
            self._pending.discard(rid)
            return self._inbox.pop(rid)
        if rid not in self._pending:
            raise ValueError(f"no request {rid} in flight")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._wait_readable(remaining):
                self.reset()
                raise Timeout(f"no reply from {self.endpoint} within "
                              f"{self.timeout if timeout is None else timeout}s")
            try:
                reply = msgpack.unpackb(self._sock.recv(), raw=False, strict_map_key=False)
            except Exception as exc:  # noqa: BLE001 - a garbled reply is the server's bug
                self.reset()
                raise Internal(f"unreadable reply: {type(exc).__name__}") from None
            if not isinstance(reply, dict):
                continue
            got = reply.get("id")
            if got == rid:
                self._pending.discard(rid)
                return reply
            if isinstance(got, int) and got in self._pending:
                self._inbox[got] = reply
            # anything else is a stray reply to a request we no longer wait for

    def _wait_readable(self, seconds: float) -> bool:
        """Whether a reply is waiting within `seconds`: busy polling first (busy_poll_us),
        then a blocking poll for the rest."""
        sock = self._sock
        if self.busy_poll:
            started = time.monotonic()
            spin_end = started + min(self.busy_poll, seconds)
            while True:
                if sock.poll(0, zmq.POLLIN):
                    return True
                now = time.monotonic()
                if now >= spin_end:
                    break
                os.sched_yield()
            seconds -= now - started
            if seconds <= 0:
                return False
        return bool(sock.poll(max(1, int(seconds * 1000)), zmq.POLLIN))

    def call(self, op: str, **fields: Any) -> dict:
        """Send, wait, raise the typed error or return the result fields."""
        return _result(self.recv(self.send(op, **fields)))

    def pipeline(self, requests: Iterable[tuple[str, dict]], window: int = 256) -> list:
        """Run many requests with up to `window` in flight. Returns, in request order,
        each result dict or the ShardKVError instance it failed with (not raised)."""
        results: list = []
        in_flight: collections.deque[tuple[int, int]] = collections.deque()  # (position, rid)
        for op, fields in requests:
            if len(in_flight) >= window:
                pos, rid = in_flight.popleft()
                results[pos] = _result_or_error(self.recv(rid))
            in_flight.append((len(results), self.send(op, **fields)))
            results.append(None)
        for pos, rid in in_flight:
            results[pos] = _result_or_error(self.recv(rid))
        return results

    # ops
    def ping(self) -> dict:
        return self.call("ping")

    def get(self, keys: Key | Iterable[Key], at: int | None = None) -> GetResult:
        """Read keys (one key or a list) at one snapshot; `at` reads an older one."""
        keys = [as_bytes(keys)] if isinstance(keys, (bytes, str)) else [as_bytes(k) for k in keys]
        fields: dict[str, Any] = {"keys": keys}
        if at is not None:
            fields["at"] = at
        r = self.call("get", **fields)
        return GetResult(r["ts"], keys, list(r["values"]), list(r["versions"]))

    def txn(self, reads: Any = None, writes: Any = None, block: int | None = None) -> int:
        """Commit writes ({key: value|None} or pairs) if every read (key -> version)
        still holds; returns commit_ts. Raises Conflict (see .keys) otherwise."""
        return self.call("txn", **self._txn_fields(reads, writes, block))["commit_ts"]

    @staticmethod
    def _txn_fields(reads: Any, writes: Any, block: int | None) -> dict:
        fields: dict[str, Any] = {"reads": _pairs(reads, _version), "writes": _pairs(writes, _write_value)}
        if block is not None:
            fields["block"] = block
        return fields

    def put(self, key: Key, value: Key) -> int:
        return self.txn(writes=[(key, as_bytes(value))])

    def delete(self, key: Key) -> int:
        return self.txn(writes=[(key, None)])

    def batch(self, txns: Iterable[dict]) -> list[int | ShardKVError]:
        """Independent txns ({"reads","writes","block"}) applied in order; each result
        is its commit_ts or the ShardKVError it failed with."""
        entries = [self._txn_fields(t.get("reads"), t.get("writes"), t.get("block")) for t in txns]
        results = self.call("batch", txns=entries)["results"]
        return [r["commit_ts"] if r.get("ok") else error_from_reply(r.get("error"))
                for r in results]

    def scan(self, start: Key | None = None, end: Key | None = None, prefix: Key | None = None,
             limit: int = 1000, at: int | None = None) -> ScanResult:
        """One page of live keys in [start, end) (and with `prefix`), bytewise order."""
        fields: dict[str, Any] = {"limit": limit}
        for name, value in (("start", start), ("end", end), ("prefix", prefix)):
            if value is not None:
                fields[name] = as_bytes(value)
        if at is not None:
            fields["at"] = at
        r = self.call("scan", **fields)
        return ScanResult(r["ts"], [tuple(item) for item in r["items"]], bool(r["more"]))

    def scan_iter(self, start: Key | None = None, end: Key | None = None,
                  prefix: Key | None = None, page: int = 1000,
                  at: int | None = None) -> Iterator[tuple[bytes, bytes, int]]:
        """Every matching item, paging through one snapshot (the first page's ts, or
        `at`), so the whole iteration sees one consistent state. The node does not hold
        that snapshot between pages: a prune that passes it (an auto-prune too) makes
        the next page raise TooOld, never return other data."""
        cursor = as_bytes(start) if start is not None else None
        while True:
            result = self.scan(cursor, end, prefix, page, at)
            at = result.ts
            yield from result.items
            if not result.more or not result.items:
                return
            cursor = result.items[-1][0] + b"\x00"   # the smallest key after the last one

    def block(self, height: int) -> dict:
        return self.call("block", height=height)

    def flush(self) -> dict:
        return self.call("flush")

    def prune(self, keep_versions: int | None = None) -> int:
        fields = {} if keep_versions is None else {"keep_versions": keep_versions}
        return self.call("prune", **fields)["versions_removed"]

    def checkpoint_create(self, name: str | None = None) -> dict:
        fields = {} if name is None else {"name": name}
        return self.call("checkpoint", action="create", **fields)

    def checkpoint_list(self) -> list[dict]:
        return self.call("checkpoint", action="list")["checkpoints"]

    def checkpoint_delete(self, name: str) -> None:
        self.call("checkpoint", action="delete", name=name)

    def stats(self) -> dict:
        return self.call("stats")

    # transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """Optimistic transaction: gets inside it read one snapshot and record each
        key's version; on a clean exit the writes commit only if none of those keys
        changed (else Conflict). An exception inside the block commits nothing."""
        tx = Transaction(self)
        yield tx
        tx.commit()

    def run_transaction(self, fn: Callable[["Transaction"], T], attempts: int = 10,
                        backoff: float = 0.01) -> T:
        """Run fn(tx) in a fresh transaction and commit it, running it again (bounded) on
        a conflict, or when a read or the commit certainly had no effect: also when a
        prune passed the snapshot the transaction reads at (its later reads answer
        too_old; a new run reads a new snapshot). A commit whose outcome is unknown (a
        Timeout, or Unavailable with outcome "unknown") is raised, not run again: it may
        have committed, and a read-modify-write run twice applies twice (the caller
        decides, e.g. by reading what it wrote)."""
        def once() -> T:
            tx = Transaction(self)
            try:
                out = fn(tx)
            except TooOld as exc:
                # too_old is final for the request (the same read at the same snapshot
                # stays too_old), not for the transaction: nothing was written
                if tx.snapshot_pruned:
                    exc.retryable = True
                raise
            try:
                tx.commit()
            except Unavailable as exc:
                if exc.outcome != "aborted":
                    exc.retryable = False
                raise
            return out
        return retry(once, attempts=attempts, backoff=backoff)


def _result(reply: dict) -> dict:
    if reply.get("ok") is True:
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}
    raise error_from_reply(reply.get("error"))


def _result_or_error(reply: dict) -> dict | ShardKVError:
    try:
        return _result(reply)
    except ShardKVError as exc:
        return exc


@dataclass
class Transaction:
    """Reads at one snapshot with version tracking, buffered writes, commit at the end."""

    client: Client
    snapshot: int | None = None
    reads: dict[bytes, int] = field(default_factory=dict)
    writes: dict[bytes, bytes | None] = field(default_factory=dict)
    commit_ts: int | None = None
    finished: bool = False      # commit() was called: a later get/put/delete raises
    snapshot_pruned: bool = False   # a read at `snapshot` answered too_old (a prune passed it)

    def _check_open(self) -> None:
        if self.finished:
            # a put after commit() used to be dropped without a word
            raise RuntimeError("this transaction has been committed: start a new one")

    def get(self, key: Key) -> bytes | None:
        """The key's value: this transaction's own write if any, else the snapshot's."""
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[Key]) -> list[bytes | None]:
        self._check_open()
        keys = [as_bytes(k) for k in keys]
        wanted = [k for k in keys if k not in self.writes]
        if wanted:
            try:
                result = self.client.get(wanted, at=self.snapshot)
            except TooOld:
                self.snapshot_pruned = self.snapshot is not None
                raise
            self.snapshot = result.ts
            for k, version in zip(wanted, result.versions):
                self.reads[k] = version
            fetched = result.as_dict()
        else:
            fetched = {}
        return [self.writes[k] if k in self.writes else fetched[k] for k in keys]

    def put(self, key: Key, value: Key) -> None:
        self._check_open()
        self.writes[as_bytes(key)] = as_bytes(value)

    def delete(self, key: Key) -> None:
        self._check_open()
        self.writes[as_bytes(key)] = None

    def commit(self) -> int | None:
        """Commit (also done by the context manager, after which a second call returns
        the same); None when nothing was touched. Once called, whatever it raised, the
        transaction takes no more reads or writes."""
        if self.finished:
            return self.commit_ts
        self.finished = True
        if not self.reads and not self.writes:
            return None
        self.commit_ts = self.client.txn(reads=self.reads, writes=self.writes)
        return self.commit_ts
