"""The `shardkv` command against a real node: each command's output and exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

from node import cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def run(cluster, capsys):
    def run(*argv):
        code = cli.main(["--endpoint", cluster.endpoint, *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_put_get_delete_scan(run):
    code, out, _ = run("put", "greeting", "hello world")
    assert code == 0 and out.startswith("commit_ts ")
    put_ts = int(out.split()[1])
    assert run("--hex", "put", "0xff00", "0x0001")[0] == 0
    code, out, _ = run("get", "greeting", "missing")
    assert code == 0
    assert out.splitlines() == [f"greeting\thello world\t{put_ts}", "missing\t(nil)\t0"]
    code, out, _ = run("--hex", "get", "ff00")
    assert out.split("\t")[:2] == ["0xff00", "0x0001"]           # not printable: hex
    for i in range(5):
        run("put", f"row/{i}", f"v{i}")
    code, out, err = run("scan", "--prefix", "row/", "--limit", "3")
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == ["row/0", "row/1", "row/2"]
    assert "more from row/3" in err           # the first key not shown
    code, out, _ = run("scan", "--start", "row/3", "--end", "row/5")
    assert [line.split("\t")[:2] for line in out.splitlines()] == [["row/3", "v3"], ["row/4", "v4"]]
    assert run("delete", "greeting")[0] == 0
    assert run("get", "greeting")[1] == "greeting\t(nil)\t0\n"


def test_admin_commands(run):
    code, out, _ = run("ping")
    assert code == 0 and out.startswith("pong: protocol 1, 2 shards")
    code, out, _ = run("block", "5")
    assert code == 0 and out.startswith("block 5")
    code, out, _ = run("flush")
    assert code == 0 and out.startswith("flushed at ts ")
    code, out, _ = run("prune", "--keep", "2")
    assert code == 0 and out.startswith("removed ")
    code, out, _ = run("checkpoint", "create", "nightly")
    assert code == 0 and out.startswith("checkpoint nightly at ts ")
    code, out, _ = run("checkpoint", "list")
    assert code == 0 and out.splitlines()[1].split()[0] == "nightly"
    assert run("checkpoint", "delete", "nightly") == (0, "deleted checkpoint nightly\n", "")
    code, out, _ = run("stats")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[0] == "shard"
    assert [line.split()[0] for line in lines[1:4]] == ["0", "1", "node"]


def test_error_replies_exit_1_with_one_line(run):
    code, out, err = run("checkpoint", "delete", "does-not-exist")
    assert (code, out) == (1, "") and err.startswith("shardkv: error: not_found")
    assert err.count("\n") == 1
    code, _, err = run("checkpoint", "create", "../escape")
    assert code == 1 and err.startswith("shardkv: error: bad_request")
    assert run("block", "10")[0] == 0
    code, _, err = run("block", "3")
    assert code == 1 and "bad_request" in err


def test_console_script_is_installed(cluster):
    exe = Path(sys.executable).parent / "shardkv"
    done = subprocess.run([str(exe), "--endpoint", cluster.endpoint, "put", "cli-key", "x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([str(exe), "--endpoint", cluster.endpoint, "get", "cli-key"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split("\t")[:2] == ["cli-key", "x"]
    done = subprocess.run([str(exe), "frobnicate"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
