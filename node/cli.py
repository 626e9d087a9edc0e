"""`shardkv`: command line for a running node.

    shardkv [--endpoint E] [--timeout S] [--hex] COMMAND ...
      ping
      get KEY...                      one line per key: KEY<TAB>VALUE<TAB>VERSION ("(nil)" if absent)
      put KEY VALUE                   prints the commit_ts
      delete KEY                      prints the commit_ts
      scan [--prefix P] [--start S] [--end E] [--limit N] [--at TS]
      stats                           per-shard and node table
      checkpoint create [NAME] | checkpoint list | checkpoint delete NAME
      flush | prune [--keep N] | block HEIGHT

Keys and values on the command line are UTF-8 text, or hex with --hex. Output shows a
key or value as text when it is valid, printable UTF-8, and otherwise as 0x<hex>.
Exit status: 0 ok, 1 error reply / node unreachable (one line on stderr), 2 usage error.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import zmq
import zmq.auth

from node.client import DEFAULT_ENDPOINT, Client, ShardKVError
from shard import histogram

EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def show(data: bytes | None) -> str:
    """Printable UTF-8 as text, anything else as 0x<hex>."""
    if data is None:
        return "(nil)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + data.hex()
    if text and not text.isprintable():
        return "0x" + data.hex()
    return text


def parse_arg(text: str, hex_mode: bool) -> bytes:
    if not hex_mode:
        return text.encode("utf-8", "surrogateescape")
    digits = text[2:] if text.lower().startswith("0x") else text
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise UsageError(f"not hex: {text!r}") from None


def seconds(text: str) -> float:
    """--timeout: seconds > 0, finite (inf or nan crashed the reply wait with a traceback)."""
    value = float(text)
    if not math.isfinite(value) or not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 (and < 1e9), got {text!r}")
    return value


def count(text: str) -> int:
    """A ts, height, limit or keep: an int from 0 to 2^63-1 (what msgpack sends as int64;
    a larger one crashed the encoder instead of reaching the node's own checks)."""
    value = int(text)
    if not 0 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2^63-1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardkv", description="Talk to a shardkv node.",
                                epilog="Values print as UTF-8 text when printable, else 0x<hex>.")
    p.add_argument("--endpoint", "-e", default=os.environ.get("SHARDKV_ENDPOINT", DEFAULT_ENDPOINT),
                   help=f"node endpoint (default $SHARDKV_ENDPOINT or {DEFAULT_ENDPOINT})")
    p.add_argument("--timeout", type=seconds, default=10.0, help="seconds to wait for a reply")
    p.add_argument("--hex", action="store_true", help="KEY/VALUE arguments are hex")
    p.add_argument("--server-key", default=os.environ.get("SHARDKV_SERVER_KEY"), metavar="FILE",
                   help="the node's CURVE public certificate (e.g. server.key): talk CURVE "
                        "(default $SHARDKV_SERVER_KEY)")
    p.add_argument("--client-cert", default=os.environ.get("SHARDKV_CLIENT_CERT"), metavar="FILE",
                   help="this client's CURVE secret certificate (e.g. client.key_secret), whose "
                        "public key the node allows (default $SHARDKV_CLIENT_CERT)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("ping", help="check the node answers")
    g = sub.add_parser("get", help="read keys")
    g.add_argument("keys", nargs="+", metavar="KEY")
    g.add_argument("--at", type=count, help="read at this commit_ts")
    s = sub.add_parser("put", help="write one key")
    s.add_argument("key", metavar="KEY")
    s.add_argument("value", metavar="VALUE")
    d = sub.add_parser("delete", help="delete one key")
    d.add_argument("key", metavar="KEY")
    sc = sub.add_parser("scan", help="list live keys in order")
    sc.add_argument("--prefix")
    sc.add_argument("--start")
    sc.add_argument("--end")
    sc.add_argument("--limit", type=count, default=1000, help="at most this many items (default 1000)")
    sc.add_argument("--at", type=count, help="scan at this commit_ts")
    sub.add_parser("stats", help="per-shard and node statistics")
    c = sub.add_parser("checkpoint", help="create, list or delete checkpoints")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cc = csub.add_parser("create")
    cc.add_argument("name", nargs="?", metavar="NAME")
    csub.add_parser("list")
    cd = csub.add_parser("delete")
    cd.add_argument("name", metavar="NAME")
    sub.add_parser("flush", help="flush every shard now")
    pr = sub.add_parser("prune", help="drop old versions")
    pr.add_argument("--keep", type=count, help="versions to keep per key (default: node config)")
    b = sub.add_parser("block", help="mark the end of a block")
    b.add_argument("height", type=count, metavar="HEIGHT")
    return p


def run(args: argparse.Namespace, kv: Client, out) -> None:
    arg = lambda text: parse_arg(text, args.hex)  # noqa: E731
    cmd = args.command
    if cmd == "ping":
        r = kv.ping()
        print(f"pong: protocol {r.get('version')}, {r.get('shards')} shards, ts {r.get('ts')}", file=out)
    elif cmd == "get":
        result = kv.get([arg(k) for k in args.keys], at=args.at)
        for key, value, version in result:
            print(f"{show(key)}\t{show(value)}\t{version}", file=out)
    elif cmd == "put":
        print(f"commit_ts {kv.put(arg(args.key), arg(args.value))}", file=out)
    elif cmd == "delete":
        print(f"commit_ts {kv.delete(arg(args.key))}", file=out)
    elif cmd == "scan":
        run_scan(args, kv, out, arg)
    elif cmd == "stats":
        out.write(format_stats(kv.stats()))
    elif cmd == "checkpoint":
        if args.action == "create":
            r = kv.checkpoint_create(args.name)
            print(f"checkpoint {r['name']} at ts {r['ts']}, block {r['block']}", file=out)
        elif args.action == "list":
            out.write(format_checkpoints(kv.checkpoint_list()))
        else:
            kv.checkpoint_delete(args.name)
            print(f"deleted checkpoint {args.name}", file=out)
    elif cmd == "flush":
        r = kv.flush()
        print(f"flushed at ts {r['flush_ts']}: {r['keys']} keys, {r['bytes']} bytes", file=out)
    elif cmd == "prune":
        print(f"removed {kv.prune(args.keep)} versions", file=out)
    elif cmd == "block":
        r = kv.block(args.height)
        print(f"block {r['height']}{' (flushed)' if r.get('flushed') else ''}", file=out)


def run_scan(args, kv: Client, out, arg) -> None:
    if args.limit < 1:
        raise UsageError("--limit must be >= 1")
    start = arg(args.start) if args.start is not None else None
    end = arg(args.end) if args.end is not None else None
    prefix = arg(args.prefix) if args.prefix is not None else None
    shown = 0
    items = kv.scan_iter(start, end, prefix, page=min(args.limit, 1000), at=args.at)
    for key, value, version in items:
        if shown == args.limit:
            # `key` is the first one not shown
            print(f"(more from {show(key)}; raise --limit or use --start)", file=sys.stderr)
            break
        print(f"{show(key)}\t{show(value)}\t{version}", file=out)
        shown += 1


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # first column (a name) left-aligned, numbers right-aligned
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def _ms(value) -> str | None:
    return None if value is None else f"{float(value):.2f}"


def _txn_counts(shard: dict) -> tuple[int, int, int]:
    txn = shard.get("txn") or {}
    committed = shard.get("txn_committed", txn.get("committed", 0)) or 0
    conflict = shard.get("txn_conflict", txn.get("conflict", 0)) or 0
    error = shard.get("txn_error", txn.get("error", 0)) or 0
    return committed, conflict, error


def _success(committed: int, conflict: int, error: int) -> str | None:
    total = committed + conflict + error
    return None if total == 0 else f"{100.0 * committed / total:.1f}%"


def _node_latency(shards: list[dict]) -> list:
    """Node P50/P90/P99: the shards' commit-latency histograms merged, when the stats
    carry them; otherwise "<=" the largest shard quantile, a true upper bound (a
    mixture's q-quantile never exceeds the largest of its parts' q-quantiles)."""
    merged = None
    try:
        for s in shards:
            snap = s.get("commit_latency")
            if not snap:
                merged = None
                break
            merged = snap if merged is None else histogram.merge(merged, snap)
    except (ValueError, KeyError, TypeError):
        merged = None
    if merged is not None and merged.get("count"):
        return [_ms(histogram.quantile(merged, q) * 1000.0) for q in (0.5, 0.9, 0.99)]
    bounds = []
    for name in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms"):
        values = [float(s[name]) for s in shards if isinstance(s.get(name), (int, float))]
        bounds.append(f"<={max(values):.2f}" if values else None)
    return bounds


def format_stats(stats: dict) -> str:
    shards = [s for s in stats.get("shards") or [] if isinstance(s, dict)]
    node = stats.get("node") or {}
    headers = ["shard", "pid", "up", "tps", "success", "p50_ms", "p90_ms", "p99_ms",
               "keys", "versions", "flushes", "keys_flushed", "bytes_flushed", "last_flush_ts"]
    rows = []
    totals = {"tps": 0.0, "keys": 0, "versions": 0, "flushes": 0, "kf": 0, "bf": 0,
              "committed": 0, "conflict": 0, "error": 0}
    for s in shards:
        flush = s.get("flush") or {}
        committed, conflict, error = _txn_counts(s)
        rows.append([s.get("shard"), s.get("pid"), "yes" if s.get("up", True) else "NO",
                     f"{float(s.get('tps') or 0):.1f}", _success(committed, conflict, error),
                     _ms(s.get("latency_p50_ms")), _ms(s.get("latency_p90_ms")),
                     _ms(s.get("latency_p99_ms")), s.get("keys"), s.get("versions"),
                     flush.get("flush_count"), flush.get("keys_flushed"),
                     flush.get("bytes_flushed"), flush.get("last_flush_ts")])
        totals["tps"] += float(s.get("tps") or 0)
        for name, value in (("keys", s.get("keys")), ("versions", s.get("versions")),
                            ("flushes", flush.get("flush_count")), ("kf", flush.get("keys_flushed")),
                            ("bf", flush.get("bytes_flushed"))):
            totals[name] += int(value or 0)
        totals["committed"] += committed
        totals["conflict"] += conflict
        totals["error"] += error
    # The node row: the router's own figures (each transaction once, latency end to end)
    # when it sends them; otherwise sums over shards and the shards' worst latency.
    if "tps" in node:
        node_tps = float(node.get("tps") or 0)
        node_success = _success(int(node.get("txn_committed") or 0), int(node.get("txn_conflict") or 0),
                                int(node.get("txn_error") or 0))
        node_latency = [_ms(node.get(f"latency_p{p}_ms")) for p in (50, 90, 99)]
    else:
        node_tps = totals["tps"]
        node_success = _success(totals["committed"], totals["conflict"], totals["error"])
        node_latency = _node_latency(shards)
    rows.append(["node", node.get("router_pid"), "yes" if all(s.get("up", True) for s in shards) else "NO",
                 f"{node_tps:.1f}", node_success, *node_latency, totals["keys"], totals["versions"],
                 totals["flushes"], totals["kf"], totals["bf"], None])
    text = _table(headers, rows)
    shown = {"tps", "success_rate", "txn_committed", "txn_conflict", "txn_error",
             "latency_p50_ms", "latency_p90_ms", "latency_p99_ms"}
    extra = {k: v for k, v in node.items()
             if isinstance(v, (int, float, str, bool)) and v is not None and k not in shown}
    requests = node.get("requests")
    if isinstance(requests, dict) and requests:
        extra["requests"] = ", ".join(f"{k} {v}" for k, v in sorted(requests.items())
                                      if isinstance(v, (int, float)))
    if extra:
        text += "\n" + "\n".join(f"{k}: {v}" for k, v in sorted(extra.items())) + "\n"
    refusing = [(s.get("disk") or {}).get("refused") for s in shards]
    if any(refusing):      # a full disk: why writes are refused, and what frees them
        text += "\n" + "\n".join(r for r in refusing if r) + "\n"
    return text


def format_checkpoints(checkpoints: list[dict]) -> str:
    if not checkpoints:
        return "(no checkpoints)\n"
    rows = []
    for c in checkpoints:
        created = c.get("created_at")
        when = (datetime.datetime.fromtimestamp(created).isoformat(sep=" ", timespec="seconds")
                if isinstance(created, (int, float)) else None)
        rows.append([c.get("name"), c.get("ts"), c.get("block"), when, c.get("bytes")])
    return _table(["name", "ts", "block", "created", "bytes"], rows)


def curve_keys(args) -> dict:
    """Client keyword arguments for CURVE from --server-key / --client-cert (certificate
    files as zmq.auth.create_certificates writes them); {} without --server-key."""
    if args.client_cert and not args.server_key:
        raise UsageError("--client-cert needs --server-key (the node's public certificate)")
    if not args.server_key:
        return {}
    server_public, _ = zmq.auth.load_certificate(args.server_key)
    keys = {"server_public_key": server_public}
    if args.client_cert:
        public, secret = zmq.auth.load_certificate(args.client_cert)
        if secret is None:
            raise UsageError(f"--client-cert {args.client_cert} holds no secret key "
                             "(use the .key_secret file)")
        keys.update(public_key=public, secret_key=secret)
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)   # exits 2 on a usage error
    try:
        with Client(args.endpoint, timeout=args.timeout, **curve_keys(args)) as kv:
            run(args, kv, sys.stdout)
    except UsageError as exc:
        print(f"shardkv: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ShardKVError as exc:
        print(f"shardkv: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError, zmq.ZMQError) as exc:
        print(f"shardkv: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
