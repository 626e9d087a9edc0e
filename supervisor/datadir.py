"""The node's data directory: owner-only creation, the node lock, NODE.json.

One process at a time owns a data dir: the running supervisor, or an offline restore.
Ownership is an exclusive `flock` on `<data-dir>/node.lock` (it vanishes with the
process, also on SIGKILL, so a crash never leaves a stale lock); the file holds the
owner's pid so the refusal can say who holds it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import time

log = logging.getLogger("shardkv.supervisor")

LOCK_NAME = "node.lock"
NODE_FILE = "NODE.json"
SHARD_DIR = re.compile(r"^shard-(\d+)$")


class DataDirError(RuntimeError):
    """The data dir cannot be used as asked; the message says why and what to do."""


def ensure_data_dir(path: str) -> None:
    """Create the data dir (and missing parents) owner-only; warn if an existing one is open."""
    if os.path.isdir(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning("data dir %s is accessible by other users (mode %o); "
                        "chmod 700 it to keep the data private", path, mode)
        return
    try:
        os.makedirs(path, mode=0o700)
        os.chmod(path, 0o700)   # makedirs' mode is filtered by the umask
    except OSError as exc:
        raise DataDirError(f"cannot create data dir {path}: {exc.strerror}") from None


# How long a start or restore waits for the processes of a node whose supervisor is gone
# (killed with SIGKILL: its router and shards then stop on their own, a shard flushing).
ORPHANS_WAIT_SECS = 10.0


class DataDirLock:
    """Exclusive ownership of a data dir for the life of this object's fd. The supervisor
    passes the fd to its router and shards (Child.spawn), so the flock holds until the
    last process of the node exits, also when the supervisor itself was killed: a restore
    or a new node never runs beside children still shutting down."""

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self, purpose: str, orphans_wait_secs: float = ORPHANS_WAIT_SECS) -> "DataDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)   # O_CLOEXEC by default
        deadline = time.monotonic() + orphans_wait_secs
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            where = os.path.dirname(self.path)
            if holder.isdigit() and pid_alive(int(holder)):
                os.close(fd)
                raise DataDirError(f"data dir {where} is in use by a running shardkv node "
                                   f"(pid {holder}); stop it before {purpose}") from None
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DataDirError(f"data dir {where} is still in use by processes of a node whose "
                                   f"supervisor (pid {holder}) is gone; they did not exit within "
                                   f"{orphans_wait_secs:.0f}s: stop them before {purpose}") from None
            time.sleep(0.1)       # the orphaned router and shards are stopping: wait for them
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock; the file stays (harmless)
            self.fd = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard_dirs(data_dir: str) -> list[int]:
    return sorted(int(m[1]) for name in os.listdir(data_dir) if (m := SHARD_DIR.match(name)))


def read_node_file(data_dir: str) -> dict | None:
    path = os.path.join(data_dir, NODE_FILE)
    try:
        with open(path) as f:
            node = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataDirError(f"{path} is unreadable ({exc}); it records the shard count "
                           f"of this data dir and must be repaired by hand{repair_hint(data_dir)}") from None
    if not isinstance(node, dict) or not isinstance(node.get("shards"), int):
        raise DataDirError(f"{path} has no integer \"shards\" field{repair_hint(data_dir)}")
    return node


def repair_hint(data_dir: str) -> str:
    """How to write NODE.json again, from the shard directories there."""
    shards = shard_dirs(data_dir)
    if not shards:
        return ""
    return (f": with {len(shards)} shard directories here (shard-{shards[0]}..shard-{shards[-1]}) "
            f"it reads {{\"shards\": {len(shards)}}}")


def check_shard_count(data_dir: str, shards: int) -> None:
    """Refuse a shard count other than the one recorded (record_shard_count)."""
    node = read_node_file(data_dir)
    if node is not None:
        if node["shards"] != shards:
            raise DataDirError(
                f"data dir {data_dir} was created with {node['shards']} shards; refusing to "
                f"open it with --shards {shards} (the shard count of a data dir is fixed; "
                f"use --shards {node['shards']} or another --data-dir)")
        return
    existing = shard_dirs(data_dir)
    if existing:
        raise DataDirError(f"data dir {data_dir} holds shard directories "
                           f"{', '.join(f'shard-{i}' for i in existing)} but no {NODE_FILE}; "
                           f"refusing to guess its shard count (if it was lost, write it again"
                           f"{repair_hint(data_dir)})")


def record_shard_count(data_dir: str, shards: int) -> None:
    """Fix the shard count of a data dir on its first start. Called only once nothing
    before the children can fail: a start refused for, say, a taken port must not tie
    the data dir to a --shards it never ran with."""
    if read_node_file(data_dir) is None:
        write_json_atomic(os.path.join(data_dir, NODE_FILE),
                          {"shards": shards, "created_at": time.time()})


def write_json_atomic(path: str, obj) -> None:
    """Write-temp + fsync + rename + fsync(dir): the file is either old or new, never torn."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
