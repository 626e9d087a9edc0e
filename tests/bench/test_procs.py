"""The processes a benchmark or soak starts (procs.py) die with it: a driver killed with
SIGKILL (a test's cleanup after a failure, a timeout) must not leave a node running."""
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e]


def test_a_node_stops_when_the_process_that_started_it_is_killed(tmp_path):
    driver_code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT / 'scripts' / 'benchmarks')!r})
        from procs import NodeProcess
        node = NodeProcess(Path({str(tmp_path)!r}) / "data", 2)
        print(node.pid, flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-c", driver_code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    node = None
    try:
        node = psutil.Process(int(driver.stdout.readline()))      # the node is ready
        tree = [node] + node.children(recursive=True)              # supervisor, router, shards
        assert len(tree) == 4
        driver.kill()
        driver.wait(10)
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [p.pid for p in alive]
        assert node.pid in {p.pid for p in gone}
    finally:
        if driver.poll() is None:
            driver.kill()
        if node is not None and node.is_running():
            for p in [node] + node.children(recursive=True):
                p.kill()
