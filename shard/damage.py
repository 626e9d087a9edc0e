"""Damaged shard files, found as a shard opens its database (README "Damaged files").

- A write-ahead log whose last record is torn is what a crash leaves: a process killed
  in the middle of a write leaves it cut short, a machine that crashed before its page
  cache reached the disk can leave zeros or stale bytes at its end. RocksDB's recovery
  keeps every record before it; the torn one was never acknowledged (in "wal" mode a
  machine crash can lose the last moments of commits anyway: README "Durability").
- A log damaged before its end (a bad sector, a stray write) is another thing: RocksDB's
  point-in-time recovery, which the shard used to open every database with, stops at the
  damage and silently drops every record after it, acknowledged commits included (seen:
  16 bytes flipped in the middle of a log dropped 1,000 of its 2,000 commits without a
  word). So a database is opened with `tolerate_corrupted_tail_records` first, which
  accepts only a cut-short tail; when that finds damage, two read-only opens tell a torn
  tail from damage before the end: one stopping at the damage (point in time), one
  skipping damaged records (skip_any_corrupted_record). If the second recovers writes
  past the first, records after the damage are intact and would be lost: the shard
  refuses to start, naming the files. Else the damage is the tail, and the database is
  opened point in time. RocksDB finds its place again only at the start of a 32 KiB
  block of the log, so damage in a log's last block reads as a torn tail (the shard logs
  what it recovered).
- A directory with database files but no CURRENT (RocksDB's pointer to its MANIFEST)
  used to be opened as a NEW database (create_if_missing) when no log file was left: an
  empty shard where data had been. It is refused.

SHARDKV_WAL_RECOVERY=point_in_time (for one start, after reading the refusal) accepts
losing what follows the damage: the old behaviour, on purpose.
"""
from __future__ import annotations

import os

ADVICE = ('stop the node and restore it from a checkpoint (scripts/node restore NAME '
          '--data-dir DIR; README "Damaged files")')
ACCEPT_LOSS_ENV = "SHARDKV_WAL_RECOVERY"


class DamagedDatabase(Exception):
    """A shard's files are damaged in a way that would lose data if it went on; the
    message names the shard directory and file, and what to do."""


def accept_loss() -> bool:
    return os.environ.get(ACCEPT_LOSS_ENV) == "point_in_time"


def wal_files(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".log"))


def check_current(path: str) -> None:
    """Refuse a directory holding database files (SST files, a non-empty log) but no
    CURRENT: opening it would create an empty database in its place."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    data = [n for n in names if n.endswith(".sst")
            or (n.endswith(".log") and os.path.getsize(os.path.join(path, n)) > 0)]
    if not data:
        return
    manifests = sorted(n for n in names if n.startswith("MANIFEST-"))
    repair = (f"; if {manifests[-1]} is intact, writing the line {manifests[-1]} into CURRENT "
              f"repairs it" if manifests else "")
    raise DamagedDatabase(
        f"{path}: has database files ({len(data)}, e.g. {sorted(data)[0]}) but no CURRENT file "
        f"(it names the MANIFEST): damaged, and opening it would start an empty shard; "
        f"{ADVICE}{repair}")


def tail_or_refuse(path: str, error: Exception, latest_seq) -> str:
    """`error`: RocksDB refused to open `path` for damage in a log (strict recovery).
    latest_seq(mode) opens it read-only in that recovery mode and returns its latest
    sequence number. Returns a line for the log when only the tail is damaged; raises
    DamagedDatabase when writes after the damage would be lost."""
    logs = ", ".join(wal_files(path)) or "none"
    try:
        kept = latest_seq("point_in_time")
        intact = latest_seq("skip_any_corrupted_record")
    except Exception as exc:      # damage RocksDB cannot open past in any mode
        then = "" if str(exc) == str(error) else f"; then: {exc}"
        raise DamagedDatabase(f"{path}: cannot be opened: {error}{then}; log files: {logs}; "
                              f"{ADVICE}") from None
    if intact > kept and not accept_loss():
        raise DamagedDatabase(
            f"{path}: its write-ahead log is damaged before its end ({error}; log files: {logs}): "
            f"recovering up to the damage would drop the intact writes after it (RocksDB "
            f"sequence numbers {kept + 1}..{intact}), acknowledged commits among them; "
            f"{ADVICE}; or start once with {ACCEPT_LOSS_ENV}=point_in_time to keep what "
            f"precedes the damage and lose the rest")
    lost = f", dropping intact writes {kept + 1}..{intact} as {ACCEPT_LOSS_ENV} asks" if intact > kept else ""
    return (f"{path}: its write-ahead log ({logs}) ended in a damaged record ({error}), as a "
            f"crash leaves it: recovered every write before it (sequence {kept}){lost}")
