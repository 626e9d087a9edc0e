"""Internal router <-> shard messages: op names and frame helpers shared by both ends.

Router -> shard: one msgpack map per frame, {"op", "rid", "inc", ...fields}.
Shard -> router: {"rid", "ok": True, ...} or {"rid", "ok": False, "error": {...}}.
A `multi` frame {"op": "multi", "inc", "msgs": [...]} carries many messages for one
shard (one frame per shard per router loop pass); the shard answers with one
{"replies": [...]} frame per pass. Replies are matched by `rid`, never by position:
a read that waits on a prepared key (deferred) is answered in a later frame.

The hot path (client txns and batches) uses one `txns` message per shard per loop pass
instead of one message per transaction: {"op": "txns", "rid", "inc", "items": [item, ...]}
with compact items, executed in order, answered by {"rid", "ok": True, "results": [...]}
holding one entry per item, in item order: None when it succeeded, else an error map
{"code", "message", "retryable", ...} (the `error` of the single-message form).

    [ITEM_COMMIT, ts, reads, writes]                      one-shot single-shard commit
    [ITEM_PREPARE, ts, reads, writes, participants]       2PC prepare, txn id = ts
    [ITEM_COMMIT_PREPARED, txn, ts]
    [ITEM_ABORT_PREPARED, txn]

Every op except `ping` must carry the shard's current incarnation `inc` (learned from
ping replies); a shard rejects other incarnations with `STALE_INC` and does nothing.
"""
import msgpack

from shard.errors import BadRequest

PING = "ping"
READ = "read"                    # keys, at                         -> values, versions
SCAN = "scan"                    # start, end, limit, at            -> items, more
VALIDATE = "validate"            # reads
COMMIT = "commit"                # ts, reads, writes
PREPARE = "prepare"              # txn, ts, reads, writes, participants
COMMIT_PREPARED = "commit_prepared"  # txn, ts
ABORT_PREPARED = "abort_prepared"    # txn
RECOVER_INFO = "recover_info"    # txns (optional)  -> prepared: [{txn, ts, participants}], outcomes: {txn: ts}
FORGET = "forget"                # txns
BLOCK = "block"                  # height                           -> flushed
FLUSH = "flush"                  # ts                               -> flush_ts, keys, bytes
PRUNE = "prune"                  # keep_versions                    -> versions_removed
CHECKPOINT = "checkpoint"        # dir, ts                          -> bytes
STATS = "stats"                  #                                  -> the stats snapshot
MULTI = "multi"                  # msgs                             -> replies (one frame)
TXNS = "txns"                    # items                            -> results (see above)

ITEM_COMMIT = 0
ITEM_PREPARE = 1
ITEM_COMMIT_PREPARED = 2
ITEM_ABORT_PREPARED = 3

OPS = frozenset({PING, READ, SCAN, VALIDATE, COMMIT, PREPARE, COMMIT_PREPARED,
                 ABORT_PREPARED, RECOVER_INFO, FORGET, BLOCK, FLUSH, PRUNE,
                 CHECKPOINT, STATS, MULTI, TXNS})

# Error code used only between router and shard: the message was addressed to another
# incarnation of the shard (it restarted), so it was not executed.
STALE_INC = "stale_inc"


def pack(msg) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(frame: bytes):
    # strict_map_key=False: outcome maps are keyed by integer txn ids.
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


# The largest int a field may hold: msgpack's (uint64), which is also the largest ts.
MAX_WIRE_INT = 2**64 - 1


def wire_int(value, name: str) -> int:
    """`value` if it is an int in 0..2^64-1, else BadRequest naming the field `name`.
    Not int(): that turned a float (1e30) into an int no log record can hold, and the
    shard died at its next sync; inf answered `internal`."""
    if type(value) is not int or not 0 <= value <= MAX_WIRE_INT:
        raise BadRequest(f"{name} must be an int in 0..{MAX_WIRE_INT}, got {value!r}")
    return value


def int_field(msg: dict, name: str) -> int:
    """wire_int of msg[name] (KeyError when it is missing)."""
    return wire_int(msg[name], name)


def ok(rid, **fields) -> dict:
    fields["rid"] = rid
    fields["ok"] = True
    return fields


def error(rid, code: str, message: str, retryable: bool = False, **extra) -> dict:
    return {"rid": rid, "ok": False,
            "error": {"code": code, "message": message, "retryable": retryable, **extra}}


def replies_of(msg) -> list:
    """The list of replies in one shard -> router frame (single or multi)."""
    if isinstance(msg, dict) and "replies" in msg:
        return msg["replies"]
    return [msg]
