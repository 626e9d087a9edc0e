"""Suite-wide settings.

`tmpfs`: a small tmpfs mounted for a disk-full test (tests/tmpfs.py).

Hypothesis: no per-example deadline (the machine is shared and noisy, and RocksDB
fsyncs vary), and on CI (CI=true) derandomized so a red run reproduces locally with
CI=true scripts/test.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

from tests import tmpfs as _tmpfs

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=True,
    print_blob=True,
)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size_mb) -> the Path of a fresh tmpfs of that size (skips where mounting is
    not permitted); unmounted at teardown. Ask for it before the fixtures that use it (it
    is then torn down after them)."""
    mounted = []

    def _mount(size_mb: int):
        where = _tmpfs.mount(tmp_path / f"tmpfs{len(mounted)}", size_mb)
        mounted.append(where)
        return where
    yield _mount
    for where in mounted:
        _tmpfs.unmount(where)
