"""The run dir: a private (0700) temporary directory for the node's Unix sockets (the
supervisor's status socket and one per shard), removed at a clean exit.

A supervisor killed with SIGKILL cannot remove its own, and each one left a directory in
/tmp behind (a thousand in a day of tests). So a run dir names its supervisor's pid, and
every start removes the run dirs whose supervisor is gone.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

from supervisor.datadir import pid_alive

PREFIX = "shardkv-"
OWNER_FILE = "supervisor.pid"
IPC_DIR_MAX = 80   # leaves room for "/shard-<i>.sock" within the 107-byte socket path limit


def make_run_dir() -> str:
    """A new run dir (in $TMPDIR, or /tmp when that path is too long for ipc://)."""
    path = tempfile.mkdtemp(prefix=PREFIX)   # mode 0700
    if len(path) > IPC_DIR_MAX:
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix=PREFIX, dir="/tmp")
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))
    return path


def remove_stale_run_dirs(parents: tuple[str, ...] | None = None) -> list[str]:
    """Remove the run dirs whose supervisor no longer runs; returns them. A dir without
    an owner file (an older version's, or one being made right now) is left alone."""
    removed = []
    for parent in parents or tuple(dict.fromkeys((tempfile.gettempdir(), "/tmp"))):
        for path in glob.glob(os.path.join(glob.escape(parent), PREFIX + "*")):
            try:
                with open(os.path.join(path, OWNER_FILE)) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if pid == os.getpid() or pid_alive(pid):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
