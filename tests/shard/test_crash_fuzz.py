"""Crash fuzzing against a model: each seed is a fresh shard that lives through several
incarnations of crash_fuzz_child.py, each checking what the crash before it left against
the model of everything acknowledged (see that file for the calls and crash points).

Bounded: SEEDS x INCARNATIONS processes of OPS calls each (about 10 s on 2 cores).
SHARDKV_CRASH_FUZZ_SEED picks another first seed (a longer hunt: a loop over it)."""
import os
import subprocess
import sys

import pytest

CHILD = os.path.join(os.path.dirname(__file__), "crash_fuzz_child.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIRST_SEED = int(os.environ.get("SHARDKV_CRASH_FUZZ_SEED", "0"))
SEEDS = 6
INCARNATIONS = 6
OPS = 60


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEEDS))
def test_every_incarnation_after_a_crash_matches_the_model(tmp_path, seed):
    env = dict(os.environ, PYTHONPATH=ROOT)
    shard_dir, events = str(tmp_path / "shard"), str(tmp_path / "events")
    for incarnation in range(INCARNATIONS):
        child_seed = seed * 1000 + incarnation
        out = subprocess.run([sys.executable, CHILD, shard_dir, events, str(child_seed), str(OPS)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, (f"seed {seed}, incarnation {incarnation} (child seed {child_seed}): "
                                     f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
