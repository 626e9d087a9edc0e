"""`shardkv-node` / `scripts/node`: run a node, or restore a checkpoint offline.

    shardkv-node [--config FILE] [--data-dir DIR] [--shards N] [--listen ENDPOINT] [--metrics-port PORT]
    shardkv-node restore NAME [--data-dir DIR] [--config FILE]

Relative paths given as flags are relative to the caller's directory (`scripts/node`
passes it in SHARDKV_CALLER_CWD because it runs from the repo root); a relative
`data_dir` in the config file is relative to the repo root (the cwd of scripts/node).
Exit status: 0 after a graceful stop, 1 when the node halts or a restore fails,
2 for a usage or configuration error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from supervisor import config as cfg
from supervisor import datadir, restore

log = logging.getLogger("shardkv.supervisor")


def caller_path(path: str) -> str:
    return os.path.join(os.environ.get("SHARDKV_CALLER_CWD", os.getcwd()), path)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/node", description="Start a shardkv node in the "
                                "foreground (stop it with SIGTERM or Ctrl-C).",
                                epilog="Offline restore: scripts/node restore NAME --data-dir DIR")
    add_common(p)
    p.add_argument("--shards", type=int, help="number of shards (fixed for a data dir)")
    p.add_argument("--listen", help="client endpoint, e.g. tcp://127.0.0.1:7450")
    p.add_argument("--metrics-port", type=int, help="HTTP port of /metrics and /healthz (0 = off)")
    return p


def restore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/node restore", description="Replace every shard "
                                "of a stopped node's data dir by a checkpoint, atomically.")
    p.add_argument("name", help="checkpoint name (see the `checkpoint list` op)")
    add_common(p)
    return p


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (default: configs/node.toml)")
    p.add_argument("--data-dir", help="data directory (overrides node.data_dir)")


def load(args) -> dict:
    # An empty flag is an error, not "the default": --data-dir "" used to become the
    # caller's cwd (abspath("")), and --config "" the shipped config, without a word.
    for flag, value in (("--data-dir", args.data_dir), ("--config", args.config)):
        if value is not None and not value.strip():
            raise cfg.ConfigError(f"{flag}: must not be empty")
    overrides = {}
    if args.data_dir is not None:
        overrides["node.data_dir"] = os.path.abspath(caller_path(args.data_dir))
    for flag, key in (("shards", "node.shards"), ("listen", "node.listen"),
                      ("metrics_port", "node.metrics_port")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    path = caller_path(args.config) if args.config else None
    return cfg.load_config(path, overrides)


def setup_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(name)s[%(process)d] "
                               "%(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    restoring = bool(argv) and argv[0] == "restore"
    args = (restore_parser() if restoring else run_parser()).parse_args(argv[1:] if restoring else argv)
    try:
        config = load(args)
    except cfg.ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    if restoring:
        return run_restore(config["node"]["data_dir"], args.name)
    from supervisor.supervisor import Supervisor
    return Supervisor(config).run()


def run_restore(data_dir: str, name: str) -> int:
    try:
        manifest = restore.restore(data_dir, name)
    except (restore.RestoreError, datadir.DataDirError) as exc:
        log.error("restore refused: %s", exc)
        return 1
    print(f"restored checkpoint {name!r} (ts {manifest.get('ts')}, block {manifest.get('block')},"
          f" {manifest.get('shards')} shards) into {data_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
