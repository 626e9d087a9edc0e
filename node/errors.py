"""The error maps the router answers clients with (PROTOCOL.md "Errors"), and how a shard's
failed reply becomes one: which shard codes reach the client as they are, and which mean
the shard is unavailable (and what that says about a txn's outcome)."""
import errno

from shard import messages as m


def err(code: str, message: str, retryable: bool = False, **extra) -> dict:
    return {"code": code, "message": message, "retryable": retryable, **extra}


def unavailable(message: str, **extra) -> dict:
    return err("unavailable", message, True, **extra)


def file_error(what: str, exc: OSError) -> dict:
    """The client error for a file operation of the router that failed: on a full disk
    `unavailable` (retryable once space is freed), else `internal`."""
    message = f"{what}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return unavailable(message + "; free space on the data dir's file system and retry")
    return err("internal", message)


def shard_error(reply: dict) -> dict:
    """A client error from a failed shard reply."""
    e = reply.get("error") or {}
    code = e.get("code")
    if code in ("conflict", "too_old", "bad_request", "not_found", "internal", "too_large"):
        return dict(e)
    return unavailable(e.get("message", "shard unavailable"))


def txn_error(reply: dict) -> dict:
    return txn_error_of(reply.get("error") or {})


def txn_error_of(e: dict) -> dict:
    """A client error for a failed txn step, from the shard's error map."""
    code = e.get("code")
    if code == m.STALE_INC:
        return unavailable("shard restarted", outcome="aborted")
    if code == "unavailable" or code is None:
        return unavailable(e.get("message", "shard unavailable"),
                           outcome="unknown" if e.get("lost") else "aborted")
    return shard_error({"error": e})
