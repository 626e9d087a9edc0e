"""commit_ts oracle with durable range reservation (DESIGN.md "Timestamps").

`<data-dir>/timestamp` holds `reserved_upto`: no ts above it was ever handed out. It is
rewritten (temp file + fsync + rename + dir fsync) whenever the next ts would pass it,
reserving RESERVE more at a time, so ts are strictly increasing and never reused across
restarts and crashes at a cost of one fsync per RESERVE allocations.

A full disk: the reservation is renewed when half of it is used, so a renewal that fails
(ENOSPC) leaves the other half to hand out while it is retried every RETRY_EVERY
allocations; only past the reservation does `next()` raise. `failure` says why the last
renewal failed, and the router answers writes `unavailable` with it while `room_for`
finds no room (reads need no new ts). A start that cannot write its reservation is not
an error for the same reason: nothing is handed out until one succeeds.
"""
import os

RESERVE = 100_000
RETRY_EVERY = 1_000


class TimestampOracle:
    def __init__(self, path: str, reserve: int = RESERVE):
        self.path = path
        self.reserve = reserve
        self.last = 0            # last allocated ts (read snapshot for get/scan)
        self.reserved_upto = 0
        self.renew_at = 0        # next() renews the reservation past this ts
        self.failure = None      # why the last renewal failed; None when it did not

    def read_reserved(self) -> int:
        """The durable reservation (0 without a file). A file that does not hold one
        number (the writer replaces it whole, so only damage makes one) raises ValueError
        naming it: the router used to fail on it in a callback, never became ready, and
        the node halted after boot_timeout_secs saying only that the router was late."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(64)
        except FileNotFoundError:
            return 0
        text = raw.decode("ascii", errors="replace").strip()
        if not text.isdigit():
            raise ValueError(
                f"{self.path} is damaged (holds {raw[:32]!r}): it records the highest commit "
                f"timestamp ever reserved, so that none is handed out twice; write into it a "
                f"number above every commit_ts your clients have seen (the highest one plus "
                f"{RESERVE} is safe), or restore a checkpoint")
        return int(text)

    def start(self, floor: int = 0) -> int:
        """Begin after both the durable reservation and `floor` (max ts seen by shards)."""
        self.last = max(self.read_reserved(), int(floor))
        self.reserved_upto = self.renew_at = self.last
        self.renew(self.last + 1)
        return self.last

    def next(self) -> int:
        ts = self.last + 1
        if ts > self.renew_at:
            self.renew(ts)
            if ts > self.reserved_upto:
                raise OSError(self.failure)
        self.last = ts
        return ts

    def renew(self, ts: int) -> None:
        """Reserve up to ts + reserve; on failure note why and retry a little later."""
        try:
            self.persist(ts + self.reserve)
        except OSError as exc:
            self.failure = f"cannot reserve commit timestamps in {self.path}: {exc.strerror or exc}"
            self.renew_at = min(ts + RETRY_EVERY, self.reserved_upto)
            return
        self.failure = None

    def room_for(self, n: int) -> bool:
        """Whether n more timestamps can be handed out (renewing now when they cannot)."""
        if self.last + n > self.reserved_upto:
            self.renew(self.last + 1)
        return self.last + n <= self.reserved_upto

    def persist(self, upto: int) -> None:
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{upto}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.reserved_upto = upto
        self.renew_at = upto - self.reserve // 2
