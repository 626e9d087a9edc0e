"""Node configuration: configs/node.toml + flag overrides, validated with clear errors.

`load_config()` returns a plain dict {section: {key: value}} with every key present
(defaults filled in), types checked, ranges checked and `node.data_dir` made absolute.
Every error names the offending key (`limits.max_key_bytes: must be >= 1, got 0`);
unknown sections and keys are errors too, so a typo is never silently ignored.
"""
from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from node.protocol import MAX_LIMIT
from node.security import curve_configured, is_loopback, load_curve_keys
from shard.batch_writer import AdaptiveConfig
from shard.busypoll import DEFAULT_WINDOW_US

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "configs" / "node.toml"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and says what is wrong."""


@dataclass(frozen=True)
class Key:
    """One config key: its type, default, and an optional extra check (returns an error or None)."""
    type: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None


def at_least(low):
    return lambda v: None if v >= low else f"must be >= {low}, got {v!r}"


def positive(v):
    return None if v > 0 else f"must be > 0, got {v!r}"


def between(low, high):
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v!r}"


def one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def non_empty(v):
    return None if v.strip() else "must not be empty"


def fraction(v):
    return None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v!r}"


NUMBER = (int, float)

# The schema mirrors configs/node.toml key for key (a test keeps the two in step).
SCHEMA: dict[str, dict[str, Key]] = {
    "node": {
        "data_dir": Key(str, "data", non_empty),
        "shards": Key(int, 2, between(1, 256)),
        "listen": Key(str, "tcp://127.0.0.1:7450"),          # checked by check_endpoint
        "metrics_host": Key(str, "127.0.0.1", non_empty),
        "metrics_port": Key(int, 9450, between(0, 65535)),  # 0 = no metrics server
        "busy_poll_us": Key(int, DEFAULT_WINDOW_US, between(0, 100_000)),  # 0 = always block in poll
    },
    "limits": {
        "max_key_bytes": Key(int, 10000, between(1, MAX_LIMIT)),
        "max_value_bytes": Key(int, 100000, between(1, MAX_LIMIT)),
        "max_txn_ops": Key(int, 10000, between(1, MAX_LIMIT)),
        "max_txn_bytes": Key(int, 10000000, between(1, MAX_LIMIT)),
        "max_frame_bytes": Key(int, 16777216, between(1024, MAX_LIMIT)),
        "max_batch_txns": Key(int, 10000, between(1, MAX_LIMIT)),
        "max_get_keys": Key(int, 10000, between(1, MAX_LIMIT)),
    },
    "durability": {
        "mode": Key(str, "wal", one_of("wal", "fsync")),
        "min_free_bytes": Key(int, 134217728, at_least(0)),     # 0 = no free-space guard
    },
    "flush": {
        "interval_secs": Key(NUMBER, 10, positive),
        "blocks_per_flush": Key(int, 100, at_least(1)),
        "flush_on_start": Key(bool, True),
    },
    "prune": {
        "keep_versions": Key(int, 3, at_least(1)),
        "auto_interval_secs": Key(NUMBER, 60, at_least(0)),
        "step_keys": Key(int, 2000, at_least(1)),
    },
    "memory": {
        "max_resident_versions": Key(int, 2000000, at_least(1)),
        "max_cached_keys": Key(int, 200000, at_least(1)),      # the engine refuses 0
    },
    "batch_writer": {
        "min_chunk": Key(int, 1000, at_least(1)),
        "max_chunk": Key(int, 8000, at_least(1)),
        "target_rsd": Key(NUMBER, 0.08, positive),
        "adjust_up": Key(NUMBER, 0.15, fraction),
        "adjust_down": Key(NUMBER, 0.30, fraction),
        "window": Key(int, 6, at_least(2)),
        "csv": Key(str, ""),
    },
    "rocksdb": {
        "write_buffer_bytes": Key(int, 67108864, at_least(65536)),
        "max_write_buffers": Key(int, 4, between(2, 64)),
        "block_cache_bytes": Key(int, 134217728, at_least(0)),
        "bloom_bits_per_key": Key(int, 10, between(0, 64)),
        "compression": Key(str, "lz4", one_of("none", "snappy", "lz4", "zstd")),
        # RocksDB takes both as a C int and bounds neither; past it rocksdict failed with
        # a message naming no key. 64 jobs is MyRocks' documented maximum of
        # rocksdb_max_background_jobs; 64 write buffers are 4 GiB of memtables a shard
        # at the default write_buffer_bytes.
        "max_background_jobs": Key(int, 2, between(1, 64)),
    },
    "router": {
        "request_timeout_secs": Key(NUMBER, 5.0, positive),
        "read_wait_secs": Key(NUMBER, 1.0, positive),
        "ping_interval_secs": Key(NUMBER, 0.2, positive),
        "shard_timeout_secs": Key(NUMBER, 2.0, positive),
    },
    "supervisor": {
        "stats_interval_secs": Key(NUMBER, 0.5, positive),
        "heartbeat_timeout_secs": Key(NUMBER, 10.0, positive),
        "boot_timeout_secs": Key(NUMBER, 30.0, positive),
        "restart_backoff_initial_secs": Key(NUMBER, 0.2, positive),
        "restart_backoff_max_secs": Key(NUMBER, 10.0, positive),
        "shutdown_grace_secs": Key(NUMBER, 15.0, positive),
    },
    "security": {
        "curve_server_secret_file": Key(str, ""),
        "curve_allowed_clients_dir": Key(str, ""),
    },
}


def defaults() -> dict:
    return {section: {name: copy.deepcopy(key.default) for name, key in keys.items()}
            for section, keys in SCHEMA.items()}


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None,
                base_dir: str | os.PathLike | None = None) -> dict:
    """Read the TOML file (None = configs/node.toml), apply overrides, validate.

    `overrides` maps dotted keys to values, e.g. {"node.shards": 4} (flags).
    A relative `node.data_dir` is resolved against `base_dir` (default: cwd).
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    config = merge(defaults(), raw, source=str(path))
    for dotted, value in (overrides or {}).items():
        section, name = dotted.split(".", 1)
        config[section][name] = value
    validate(config, base_dir)
    return config


def merge(config: dict, raw: dict, source: str) -> dict:
    """Copy raw's values over the defaults, refusing anything the schema does not know."""
    unknown = []
    for section, values in raw.items():
        if section not in SCHEMA:
            unknown.append(f"[{section}]")
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a table ([{section}]), got {values!r}")
        for name, value in values.items():
            if name not in SCHEMA[section]:
                unknown.append(f"{section}.{name}")
            else:
                config[section][name] = value
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s): {', '.join(unknown)} "
                          f"(see configs/node.toml for every valid key)")
    return config


def validate(config: dict, base_dir: str | os.PathLike | None = None) -> None:
    """Raise ConfigError naming the first bad key; make paths absolute (against base_dir)."""
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            value = config[section][name]
            where = f"{section}.{name}"
            if not type_ok(value, key.type):
                raise ConfigError(f"{where}: must be {type_name(key.type)}, got {value!r}")
            if not finite(value):
                raise ConfigError(f"{where}: must be a finite number, got {value!r}")
            problem = key.check(value) if key.check else None
            if problem:
                raise ConfigError(f"{where}: {problem}")
    check_cross_keys(config)
    resolve_paths(config, Path(base_dir) if base_dir is not None else Path.cwd())
    check_batch_writer(config, os.environ)
    check_endpoint(config["node"]["listen"], "node.listen")
    check_security(config)


def resolve_paths(config: dict, base: Path) -> None:
    """Children get absolute paths, so their cwd never matters."""
    config["node"]["data_dir"] = str((base / config["node"]["data_dir"]).resolve())
    for section, name in (("security", "curve_server_secret_file"),
                          ("security", "curve_allowed_clients_dir"), ("batch_writer", "csv")):
        if config[section][name]:
            config[section][name] = str((base / config[section][name]).resolve())


def type_ok(value, expected) -> bool:
    if isinstance(value, bool):   # bool is an int subclass; only a bool key takes it
        return expected is bool
    return isinstance(value, expected)


def finite(value) -> bool:
    """TOML allows inf and nan. inf passes every range check here, and as an interval,
    timeout or target it means "never", which no key can usefully mean."""
    return not isinstance(value, float) or math.isfinite(value)


def type_name(expected) -> str:
    if expected == NUMBER:
        return "a number"
    return {int: "an integer", str: "a string", bool: "true or false"}[expected]


def check_cross_keys(config: dict) -> None:
    bw, sup, router = config["batch_writer"], config["supervisor"], config["router"]
    if bw["max_chunk"] < bw["min_chunk"]:
        raise ConfigError(f"batch_writer.max_chunk: must be >= batch_writer.min_chunk "
                          f"({bw['min_chunk']}), got {bw['max_chunk']}")
    if sup["restart_backoff_max_secs"] < sup["restart_backoff_initial_secs"]:
        raise ConfigError("supervisor.restart_backoff_max_secs: must be >= "
                          "supervisor.restart_backoff_initial_secs")
    if sup["heartbeat_timeout_secs"] <= sup["stats_interval_secs"]:
        raise ConfigError(f"supervisor.heartbeat_timeout_secs: must be > "
                          f"supervisor.stats_interval_secs ({sup['stats_interval_secs']}), "
                          f"got {sup['heartbeat_timeout_secs']}")
    # The router checks a shard's last pong at each ping tick: with a timeout no longer
    # than the interval, a healthy shard is declared down at every tick.
    if router["shard_timeout_secs"] <= router["ping_interval_secs"]:
        raise ConfigError(f"router.shard_timeout_secs: must be > router.ping_interval_secs "
                          f"({router['ping_interval_secs']}), got {router['shard_timeout_secs']}")
    limits = config["limits"]
    if limits["max_frame_bytes"] < limits["max_key_bytes"] + limits["max_value_bytes"]:
        raise ConfigError("limits.max_frame_bytes: must be >= max_key_bytes + max_value_bytes "
                          "(a frame must be able to carry one maximal write)")


def check_batch_writer(config: dict, environ) -> None:
    """Build the batch writer's settings as every shard does, from [batch_writer] and the
    SHARDKV_ADAPT_* variables the shards inherit: a bad override stops the start here,
    naming the variable, instead of killing the shards (or, without flush_on_start,
    crash-looping them at their first flush)."""
    try:
        AdaptiveConfig.from_dict(config["batch_writer"], environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


TCP_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]/]+):(?P<port>\d+)$")


def check_endpoint(endpoint: str, where: str) -> None:
    """A bindable ZeroMQ endpoint: tcp://HOST:PORT (PORT 1..65535) or ipc://PATH."""
    if endpoint.startswith("ipc://"):
        if len(endpoint) <= len("ipc://"):
            raise ConfigError(f"{where}: ipc endpoint needs a path, got {endpoint!r}")
        return
    match = TCP_ENDPOINT.match(endpoint)
    if not match:
        raise ConfigError(f"{where}: must be tcp://HOST:PORT or ipc://PATH, got {endpoint!r}")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port must be between 1 and 65535, got {port}")


def check_security(config: dict) -> None:
    """Keys that are set must be usable, on any listen address (the router enforces them
    on loopback too); a non-loopback listen address needs them."""
    if curve_configured(config):
        try:
            load_curve_keys(config["security"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return
    listen = config["node"]["listen"]
    if not is_loopback(listen):
        raise ConfigError(
            f"node.listen: {listen} is not a loopback address; binding it requires "
            f"security.curve_server_secret_file and security.curve_allowed_clients_dir "
            f"(ZeroMQ CURVE), or listen on tcp://127.0.0.1:PORT")
