"""Run dirs: private, named after their supervisor, and removed by a later start once that
supervisor is gone (a SIGKILLed one cannot remove its own)."""
import os
import stat
import subprocess
import sys

from supervisor import rundir


def make_dir(parent, name, owner=None):
    path = parent / (rundir.PREFIX + name)
    path.mkdir()
    (path / "supervisor.sock").touch()
    if owner is not None:
        (path / rundir.OWNER_FILE).write_text(str(owner))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_dir_is_private_and_names_its_supervisor():
    path = rundir.make_run_dir()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert len(path) <= rundir.IPC_DIR_MAX
        with open(os.path.join(path, rundir.OWNER_FILE)) as f:
            assert int(f.read()) == os.getpid()
    finally:
        subprocess.run(["rm", "-rf", path], check=True)


def test_only_the_run_dirs_of_supervisors_that_are_gone_are_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        gone = make_dir(tmp_path, "gone", owner=dead_pid())
        running = make_dir(tmp_path, "running", owner=live.pid)
        mine = make_dir(tmp_path, "mine", owner=os.getpid())
        unowned = make_dir(tmp_path, "old", owner=None)        # an older version's, or being made
        garbled = make_dir(tmp_path, "garbled", owner="not a pid")
        other = tmp_path / "not-ours"
        other.mkdir()
        (other / rundir.OWNER_FILE).write_text(str(dead_pid()))
        assert rundir.remove_stale_run_dirs((str(tmp_path),)) == [str(gone)]
        assert not gone.exists()
        assert all(p.exists() for p in (running, mine, unowned, garbled, other))
    finally:
        live.kill()
        live.wait()
