"""Benchmark suite entry point: `scripts/bench {engine,node,all} [--quick] [--out DIR]`.

Prints progress on stderr, the markdown table on stdout, and writes report.json,
report.md, PNG plots and cProfile profiles under reports/<timestamp>/ (or --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import Report, caller_path, log, timestamp_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=("engine", "node", "all"))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds to a minute")
    parser.add_argument("--out", type=Path, help="report directory (default reports/<timestamp>)")
    parser.add_argument("--shards", default=None,
                        help="node suite: comma-separated shard counts for the scaling figure (default 1,2,4)")
    args = parser.parse_args(argv)

    out = caller_path(args.out) if args.out else timestamp_dir()
    report = Report(title=f"shardkv benchmarks: {args.suite}", quick=args.quick, out_dir=out)
    log(f"suite {args.suite}{' (quick)' if args.quick else ''}; report -> {out}")
    try:
        if args.suite in ("engine", "all"):
            import engine_suite
            engine_suite.run(report, args.quick)
        if args.suite in ("node", "all"):
            import node_suite
            shard_counts = [int(s) for s in args.shards.split(",")] if args.shards else None
            node_suite.run(report, args.quick, shard_counts)
    finally:
        report.write()
    print(report.markdown_table())
    log(f"report written: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
