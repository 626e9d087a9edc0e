"""Engine errors. Each carries the protocol error code (PROTOCOL.md) and whether a
client may retry, so the worker turns any of them into a reply without a lookup table."""


class EngineError(Exception):
    code = "internal"
    retryable = False

    def to_error(self) -> dict:
        """The protocol `error` map for this exception."""
        return {"code": self.code, "message": str(self), "retryable": self.retryable}


class Conflict(EngineError):
    """A read version no longer matches, or a key is locked by a prepared txn."""
    code = "conflict"
    retryable = True

    def __init__(self, keys):
        self.keys = list(keys)
        super().__init__(f"conflict on {len(self.keys)} key(s)")

    def to_error(self) -> dict:
        error = super().to_error()
        error["keys"] = self.keys
        return error


class TooOld(EngineError):
    """A snapshot ts below the read horizon (its versions were pruned)."""
    code = "too_old"

    def __init__(self, horizon: int, at: int | None = None):
        self.horizon = horizon
        super().__init__(f"snapshot {at} is older than the read horizon {horizon}")

    def to_error(self) -> dict:
        error = super().to_error()
        error["horizon"] = self.horizon
        return error


class Blocked(EngineError):
    """A read met keys prepared (outcome unknown) by these txns at a ts <= the snapshot.
    The worker defers the read and retries it; it becomes `unavailable` after a timeout."""
    code = "unavailable"
    retryable = True

    def __init__(self, txn_ids):
        self.txn_ids = sorted(set(txn_ids))
        super().__init__(f"read blocked by prepared transaction(s) {self.txn_ids}")


class Unavailable(EngineError):
    """The shard cannot take this request now (its disk is full); nothing was applied.
    `fields` go into the error map (read_only: the database is open read-only)."""
    code = "unavailable"
    retryable = True

    def __init__(self, msg: str, **fields):
        super().__init__(msg)
        self.fields = fields

    def to_error(self) -> dict:
        return {**super().to_error(), **self.fields}


class BadRequest(EngineError):
    code = "bad_request"

    def __init__(self, msg: str):
        super().__init__(msg)


class StorageMismatch(EngineError):
    """The directory belongs to another shard id / shard count, or is not a shard dir."""
    code = "internal"

    def __init__(self, msg: str):
        super().__init__(msg)
