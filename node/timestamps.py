"""commit_ts oracle with durable range reservation (DESIGN.md "Timestamps").

`<data-dir>/timestamp` holds `reserved_upto`: no ts above it was ever handed out. It is
rewritten (temp file + fsync + rename + dir fsync) whenever the next ts would pass it,
reserving RESERVE more at a time, so ts are strictly increasing and never reused across
restarts and crashes at a cost of one fsync per RESERVE allocations.
"""
import os

RESERVE = 100_000


class TimestampOracle:
    def __init__(self, path: str, reserve: int = RESERVE):
        self.path = path
        self.reserve = reserve
        self.last = 0            # last allocated ts (read snapshot for get/scan)
        self.reserved_upto = 0

    def read_reserved(self) -> int:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0

    def start(self, floor: int = 0) -> int:
        """Begin after both the durable reservation and `floor` (max ts seen by shards)."""
        self.last = max(self.read_reserved(), int(floor))
        self.reserved_upto = self.last
        self.persist(self.last + self.reserve)
        return self.last

    def next(self) -> int:
        ts = self.last + 1
        if ts > self.reserved_upto:
            self.persist(ts + self.reserve)
        self.last = ts
        return ts

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
