"""Suite-wide settings.

Hypothesis: no per-example deadline (the machine is shared and noisy, and RocksDB
fsyncs vary), and on CI (CI=true) derandomized so a red run reproduces locally with
CI=true scripts/test.
"""
import os

from hypothesis import HealthCheck, settings

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
