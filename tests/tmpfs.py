"""A small tmpfs for disk-full tests: mounted for the test, unmounted after it.

Mounting needs root (or CAP_SYS_ADMIN); where it is not permitted the test is skipped
with the reason. A filler file in the same tmpfs stands for everything else on the disk:
write it to fill the disk, delete it to free space.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest


def mount(where: Path, size_mb: int) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs",
                             str(where)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(result.stderr or '').strip() or result.returncode}): "
                    f"the disk-full tests need one (run as root)")
    return where


def unmount(where: Path) -> None:
    """Unmount; a process still holding a file there (it is being killed) gets a few
    tries, then a lazy unmount, so nothing is left mounted."""
    deadline = time.monotonic() + 5
    while subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
            return
        time.sleep(0.1)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0, chunk: int = 1 << 16) -> int:
    """Write the file `path` until at most `leave` bytes are free in its file system (all
    of them: until ENOSPC); returns its size."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * chunk
        while free_bytes(path.parent) > leave:
            want = min(chunk, max(4096, free_bytes(path.parent) - leave))
            try:
                written += os.write(fd, block[:want])
            except OSError:          # ENOSPC: full
                break
    finally:
        os.close(fd)
    return written
