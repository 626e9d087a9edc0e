"""Config loading: defaults match configs/node.toml, every bad value is refused naming its key."""
import os
import subprocess
import tomllib

import pytest
import zmq.auth

from supervisor.config import (DEFAULT_CONFIG_PATH, NUMBER, SCHEMA, ConfigError, defaults,
                               load_config)
from supervisor_harness import ROOT


def write(tmp_path, text):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_schema_defaults_are_exactly_the_shipped_config():
    shipped = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    assert shipped == defaults()
    assert shipped.keys() == SCHEMA.keys()


def test_shipped_config_loads_and_data_dir_becomes_absolute(tmp_path):
    config = load_config(None, base_dir=tmp_path)
    assert config["node"]["data_dir"] == str(tmp_path / "data")
    assert config["node"]["listen"] == "tcp://127.0.0.1:7450"


def test_missing_keys_take_defaults_and_overrides_win(tmp_path):
    path = write(tmp_path, '[node]\nshards = 4\n')
    config = load_config(path, {"node.listen": "ipc:///tmp/x.sock"}, base_dir=tmp_path)
    assert config["node"]["shards"] == 4
    assert config["node"]["listen"] == "ipc:///tmp/x.sock"
    assert config["durability"]["mode"] == "wal"


@pytest.mark.parametrize("text, message", [
    ("[node]\nshards = 0\n", "node.shards: must be between 1 and 256, got 0"),
    ("[node]\nshards = \"2\"\n", "node.shards: must be an integer, got '2'"),
    ("[node]\nshards = true\n", "node.shards: must be an integer, got True"),
    ("[node]\nshard = 2\n", "unknown config key(s): node.shard"),
    ("[nodes]\nshards = 2\n", "unknown config key(s): [nodes]"),
    ("[durability]\nmode = \"async\"\n", "durability.mode: must be one of wal, fsync, got 'async'"),
    ("[flush]\nflush_on_start = 1\n", "flush.flush_on_start: must be true or false, got 1"),
    ("[flush]\ninterval_secs = 0\n", "flush.interval_secs: must be > 0, got 0"),
    ("[flush]\ninterval_secs = nan\n", "flush.interval_secs: must be a finite number, got nan"),
    # passed the loader, then every shard refused it at boot (the engine needs >= 1)
    ("[memory]\nmax_cached_keys = 0\n", "memory.max_cached_keys: must be >= 1, got 0"),
    ("[router]\nrequest_timeout_secs = \"5\"\n", "router.request_timeout_secs: must be a number"),
    ("[rocksdb]\ncompression = \"gzip\"\n", "rocksdb.compression: must be one of"),
    ("[limits]\nmax_key_bytes = -1\n", "limits.max_key_bytes: must be between 1 and 1073741824, got -1"),
    # "unlimited" written as a huge number: every txn failed `internal` (C ssize_t overflow)
    ("[limits]\nmax_txn_bytes = 9223372036854775808\n",
     "limits.max_txn_bytes: must be between 1 and 1073741824, got 9223372036854775808"),
    # beyond a C int rocksdict failed inside every shard, naming no key
    ("[rocksdb]\nmax_background_jobs = 2147483648\n",
     "rocksdb.max_background_jobs: must be between 1 and 64, got 2147483648"),
    ("[rocksdb]\nmax_write_buffers = 65\n", "rocksdb.max_write_buffers: must be between 2 and 64, got 65"),
    ("[node]\nmetrics_port = 70000\n", "node.metrics_port: must be between 0 and 65535"),
    ("[node]\nbusy_poll_us = -1\n", "node.busy_poll_us: must be between 0 and 100000, got -1"),
    ("[node]\nbusy_poll_us = 0.5\n", "node.busy_poll_us: must be an integer, got 0.5"),
    ("[batch_writer]\nmin_chunk = 10\nmax_chunk = 5\n", "batch_writer.max_chunk: must be >= batch_writer.min_chunk"),
    ("[supervisor]\nheartbeat_timeout_secs = 0.1\n", "supervisor.heartbeat_timeout_secs: must be > supervisor.stats_interval_secs"),
    # the router then declared every healthy shard down at each ping tick
    ("[router]\nping_interval_secs = 1.0\nshard_timeout_secs = 0.5\n",
     "router.shard_timeout_secs: must be > router.ping_interval_secs (1.0), got 0.5"),
    ("[router]\nping_interval_secs = 2\n", "router.shard_timeout_secs: must be > router.ping_interval_secs"),
    ("[node]\nlisten = \"127.0.0.1:7450\"\n", "node.listen: must be tcp://HOST:PORT or ipc://PATH"),
    ("[node]\nlisten = \"tcp://127.0.0.1:0\"\n", "node.listen: port must be between 1 and 65535"),
    ("[node]\nlisten = \"tcp://127.0.0.1:99999\"\n", "node.listen: port must be between 1 and 65535"),
    ("node = 3\n", "node: must be a table"),
    ("[node\n", "is not valid TOML"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), base_dir=tmp_path)
    assert message in str(err.value)


NUMBER_KEYS = [f"{section}.{name}" for section, keys in SCHEMA.items()
               for name, key in keys.items() if key.type == NUMBER]


@pytest.mark.parametrize("dotted", NUMBER_KEYS)
@pytest.mark.parametrize("value", ["inf", "+inf"])
def test_every_number_key_refuses_infinity(tmp_path, dotted, value):
    """TOML's inf passed every range check: ping_interval_secs = inf left the router
    never ready, target_rsd = inf killed the shards, backoffs of inf never restarted."""
    section, name = dotted.split(".")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"[{section}]\n{name} = {value}\n"), base_dir=tmp_path)
    assert f"{dotted}: must be a finite number, got inf" in str(err.value)


@pytest.mark.parametrize("variable, value, message", [
    ("SHARDKV_ADAPT_WINDOW", "1", "SHARDKV_ADAPT_WINDOW=1: must be >= 2"),
    ("SHARDKV_ADAPT_MAX_CHUNK", "abc", "SHARDKV_ADAPT_MAX_CHUNK='abc': expected an integer"),
    ("SHARDKV_ADAPT_TARGET_RSD", "inf", "SHARDKV_ADAPT_TARGET_RSD=inf: must be a finite number"),
    ("SHARDKV_ADAPT_DOWN_PCT", "100", "SHARDKV_ADAPT_DOWN_PCT=1.0: must be in [0, 1)"),
    ("SHARDKV_ADAPT_MIN_CHUNK", "", "SHARDKV_ADAPT_MIN_CHUNK='': empty value"),
])
def test_a_bad_batch_writer_env_override_is_a_config_error_naming_it(tmp_path, monkeypatch,
                                                                      variable, value, message):
    """Checked only when a shard first built its writer: the shards died with a traceback,
    or, without flush_on_start, the node announced ready and then crash-looped."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_config(None, base_dir=tmp_path)
    assert message in str(err.value)


def test_a_good_batch_writer_env_override_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDKV_ADAPT_WINDOW", "8")
    monkeypatch.setenv("SHARDKV_ADAPT_TARGET_RSD", "5%")
    load_config(None, base_dir=tmp_path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.fixture
def curve_files(tmp_path):
    """A server certificate pair and a dir holding one client's public key."""
    server_public, server_secret = zmq.auth.create_certificates(str(tmp_path), "server")
    clients = tmp_path / "clients"
    clients.mkdir()
    zmq.auth.create_certificates(str(clients), "client")
    return {"public": server_public, "secret": server_secret, "clients": str(clients)}


def security(secret="", clients=""):
    return {"security.curve_server_secret_file": secret, "security.curve_allowed_clients_dir": clients}


def test_non_loopback_listen_needs_curve_keys(tmp_path, curve_files):
    with pytest.raises(ConfigError, match="node.listen: tcp://0.0.0.0:7450 is not a loopback address"):
        load_config(None, {"node.listen": "tcp://0.0.0.0:7450"}, base_dir=tmp_path)
    keys = {"node.listen": "tcp://0.0.0.0:7450", **security("server.key_secret", "clients")}
    config = load_config(None, keys, base_dir=tmp_path)
    assert config["security"]["curve_server_secret_file"] == curve_files["secret"]   # made absolute


@pytest.mark.parametrize("listen", ["tcp://127.0.0.1:7450", "tcp://0.0.0.0:7450"])
def test_curve_keys_are_checked_at_load_on_any_listen(tmp_path, curve_files, listen):
    """On loopback the keys were checked only by the router, once every process ran."""
    def refused(keys, message):
        with pytest.raises(ConfigError) as err:
            load_config(None, {"node.listen": listen, **keys}, base_dir=tmp_path)
        assert message in str(err.value)

    refused(security("missing", "clients"), "security.curve_server_secret_file: ")
    (tmp_path / "garbage").write_text("garbage\n")
    refused(security("garbage", "clients"), "garbage is not a ZeroMQ certificate")
    refused(security(curve_files["public"], "clients"), "server.key holds no secret key")
    (tmp_path / "forged").write_text('public-key = "abc"\nsecret-key = "def"\n')
    refused(security("forged", "clients"), "its secret key is not a CURVE key")
    refused(security("server.key_secret", "missing"), "security.curve_allowed_clients_dir: ")
    (tmp_path / "empty").mkdir()
    refused(security("server.key_secret", "empty"), "empty holds no client public key")
    load_config(None, {"node.listen": listen, **security("server.key_secret", "clients")},
                base_dir=tmp_path)


@pytest.mark.parametrize("keys, message", [
    # the allowed-clients dir alone was silently ignored: any client got in
    (security(clients="clients"), "security.curve_server_secret_file: must be set when "
                                  "curve_allowed_clients_dir is"),
    (security(secret="server.key_secret"), "security.curve_allowed_clients_dir: must be set when "
                                           "curve_server_secret_file is"),
])
def test_a_half_set_security_section_is_a_config_error(tmp_path, curve_files, keys, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, keys, base_dir=tmp_path)
    assert message in str(err.value)


def test_scripts_node_reports_a_bad_flag_value_and_exits_2(tmp_path):
    result = subprocess.run([str(ROOT / "scripts" / "node"), "--shards", "0", "--data-dir",
                             str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "configuration error: node.shards: must be between 1 and 256, got 0" in result.stderr
    assert not (tmp_path / "d").exists()      # nothing was created


def test_scripts_node_resolves_a_relative_data_dir_against_the_callers_cwd(tmp_path):
    (tmp_path / "bad.toml").write_text("[node]\nshards = 2\nlisten = \"tcp://0.0.0.0:1\"\n")
    result = subprocess.run([str(ROOT / "scripts" / "node"), "--config", "bad.toml"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "is not a loopback address" in result.stderr
    result = subprocess.run([str(ROOT / "scripts" / "node"), "restore", "x", "--data-dir", "rel"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert f"data dir {tmp_path / 'rel'} does not exist" in result.stderr


@pytest.mark.parametrize("argv", [["--data-dir", ""], ["--config", ""], ["restore", "x", "--data-dir", " "]])
def test_an_empty_path_flag_is_a_config_error_and_creates_nothing(tmp_path, argv):
    """--data-dir "" used to make the caller's cwd the data dir (NODE.json, shard-*, the
    lock and the timestamp file written there) and --config "" to mean the default."""
    from supervisor import main as supervisor_main
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert supervisor_main.main(argv) == 2
    finally:
        os.chdir(cwd)
    assert list(tmp_path.iterdir()) == []
