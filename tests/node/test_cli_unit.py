"""CLI pieces that need no node: value display, argument parsing, the stats table,
exit codes for usage errors and an unreachable node."""
import pytest

from node import cli


@pytest.mark.parametrize("data,shown", [
    (b"hello world", "hello world"), ("é".encode(), "é"), (b"", ""), (None, "(nil)"),
    (b"\x00\x01", "0x0001"), (b"\xff", "0xff"), (b"tab\there", "0x74616209686572" + "65"),
    (b"line\n", "0x6c696e650a")])
def test_show_prints_printable_utf8_else_hex(data, shown):
    assert cli.show(data) == shown


def test_parse_arg_text_and_hex():
    assert cli.parse_arg("é", False) == "é".encode()
    assert cli.parse_arg("0x00ff", True) == b"\x00\xff"
    assert cli.parse_arg("00ff", True) == b"\x00\xff"
    with pytest.raises(cli.UsageError):
        cli.parse_arg("zz", True)


@pytest.mark.parametrize("argv", [[], ["nope"], ["get"], ["put", "k"], ["block", "x"],
                                  ["checkpoint"], ["checkpoint", "delete"], ["scan", "--limit", "z"],
                                  # these crashed with a traceback (an audit of the CLI)
                                  ["--timeout", "inf", "ping"], ["--timeout", "nan", "ping"],
                                  ["--timeout", "0", "ping"], ["--timeout", "-1", "ping"],
                                  ["get", "k", "--at", str(2**64)], ["block", str(2**64)],
                                  ["prune", "--keep", "-1"], ["scan", "--limit", str(2**70)]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--endpoint", "tcp://127.0.0.1:1"] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_bad_hex_argument_exits_2(capsys):
    assert cli.main(["--endpoint", "tcp://127.0.0.1:1", "--hex", "get", "xyz"]) == 2
    assert "not hex" in capsys.readouterr().err


def test_unreachable_node_exits_1_with_one_line(capsys):
    assert cli.main(["--endpoint", "tcp://127.0.0.1:1", "--timeout", "0.2", "ping"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shardkv: error: unavailable") and err.count("\n") == 1


def test_stats_table_has_a_row_per_shard_and_a_node_row():
    snap = {"bounds": [0.001, 0.01], "counts": [3, 1, 0], "sum": 0.01, "count": 4}
    shard = lambda i: {"shard": i, "pid": 100 + i, "up": True, "keys": 10, "versions": 12,  # noqa: E731
                       "txn_committed": 9, "txn_conflict": 1, "tps": 2.5,
                       "latency_p50_ms": 0.5, "latency_p90_ms": 0.9, "latency_p99_ms": 1.2,
                       "commit_latency": snap,
                       "flush": {"flush_count": 2, "keys_flushed": 10, "bytes_flushed": 400,
                                 "last_flush_ts": 77, "last_flush_block": 3}}
    text = cli.format_stats({"node": {"supervisor_pid": 1, "router_pid": 2},
                             "shards": [shard(0), shard(1)]})
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["shard", "pid", "up", "tps", "success"]
    assert lines[1].split()[:5] == ["0", "100", "yes", "2.5", "90.0%"]
    node = lines[3].split()
    assert node[:5] == ["node", "2", "yes", "5.0", "90.0%"] and node[8:10] == ["20", "24"]
    assert "supervisor_pid: 1" in text


def test_checkpoint_list_formatting():
    assert cli.format_checkpoints([]) == "(no checkpoints)\n"
    text = cli.format_checkpoints([{"name": "a", "ts": 5, "block": 1, "created_at": 0.0, "bytes": 9}])
    assert text.splitlines()[1].split()[:3] == ["a", "5", "1"]


def test_node_latency_without_histograms_is_an_upper_bound():
    shards = [{"shard": 0, "latency_p50_ms": 1.0, "latency_p90_ms": 2.0, "latency_p99_ms": 3.0},
              {"shard": 1, "latency_p50_ms": 4.0, "latency_p90_ms": 5.0, "latency_p99_ms": 6.0}]
    node_row = cli.format_stats({"node": {}, "shards": shards}).splitlines()[3].split()
    assert node_row[0] == "node" and node_row[5:8] == ["<=4.00", "<=5.00", "<=6.00"]


def test_node_row_uses_the_routers_end_to_end_figures():
    shards = [{"shard": 0, "up": True, "tps": 40.0, "latency_p99_ms": 9.0,
               "txn_committed": 10, "txn_conflict": 0},
              {"shard": 1, "up": True, "tps": 40.0, "latency_p99_ms": 9.0,
               "txn_committed": 10, "txn_conflict": 0}]
    node = {"router_pid": 7, "tps": 25.0, "txn_committed": 3, "txn_conflict": 1, "txn_error": 0,
            "latency_p50_ms": 0.4, "latency_p90_ms": 0.6, "latency_p99_ms": 1.5}
    lines = cli.format_stats({"node": node, "shards": shards}).splitlines()
    node_row = next(line.split() for line in lines if line.split()[:1] == ["node"])
    assert node_row[3] == "25.0", "node TPS counts each transaction once, not once per shard"
    assert node_row[4] == "75.0%"
    assert node_row[5:8] == ["0.40", "0.60", "1.50"]


def test_stats_say_why_a_shard_refuses_writes():
    refused = "shard 1: disk nearly full: 1.0 MiB free ..."
    shards = [{"shard": 0, "disk": {"writes": "ok", "refused": ""}},
              {"shard": 1, "disk": {"writes": "low_space", "refused": refused}}]
    text = cli.format_stats({"node": {}, "shards": shards})
    assert text.splitlines()[-1] == refused and text.count("disk nearly full") == 1
    assert "disk" not in cli.format_stats({"node": {}, "shards": shards[:1]})
