"""Shared pieces of the benchmark suite: figures, the report writer, profiling, timing.

A run collects `Figure`s (value, the peer or limit it is compared with, the ratio and the
target ratio) plus named time series for plots, then writes under reports/<timestamp>/:

    report.json   every figure, series and environment fact
    report.md     the markdown table printed at the end of the run
    *.png         plots (matplotlib, Agg backend: no display needed)
    *.prof        cProfile profiles of the hot paths (open with `python -m pstats`)
    *.txt         the top of each profile, sorted by cumulative time
"""
from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    """Progress line (stderr keeps stdout for the final table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Figure:
    """One measured figure, compared with a peer or a limit measured in the same run."""
    suite: str
    name: str
    value: float
    unit: str
    peer: str = ""                  # what it is compared with ("raw WriteBatch WAL off", "Redis")
    peer_value: float | None = None
    higher_is_better: bool = True
    target: float | None = None     # wanted ratio (value/peer, or peer/value when lower is better)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer_value in (None, 0) or self.value is None:
            return None
        return self.value / self.peer_value

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["met"] = self.met
        return d


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("ops/s", "txn/s", "transfers/s", "keys/s", "versions/s", "puts/s"):
        return f"{value:,.0f} {unit}"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:,.3g} {unit}".strip()


@dataclass
class Report:
    title: str
    quick: bool
    out_dir: Path
    figures: list[Figure] = field(default_factory=list)
    series: dict = field(default_factory=dict)          # name -> {"x": [...], "y": {...}, ...}
    plots: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        ratio = f"  ratio {fig.ratio:.2f}" if fig.ratio is not None else ""
        log(f"{fig.suite}: {fig.name} = {fmt(fig.value, fig.unit)}"
            + (f"  vs {fig.peer} {fmt(fig.peer_value, fig.unit)}" if fig.peer else "") + ratio)
        return fig

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(text)

    # -- output -----------------------------------------------------------------------------
    def markdown_table(self) -> str:
        lines = ["| suite | figure | value | peer / limit | peer value | ratio | target | met |",
                 "|---|---|---|---|---|---|---|---|"]
        for f in self.figures:
            ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
            if f.target is None:
                target = "-"
            else:
                target = (">= " if f.higher_is_better else "<= ") + f"{f.target:g}x"
            met = {None: "-", True: "yes", False: "**no**"}[f.met]
            lines.append(f"| {f.suite} | {f.name} | {fmt(f.value, f.unit)} | {f.peer or '-'} | "
                         f"{fmt(f.peer_value, f.unit)} | {ratio} | {target} | {met} |")
        return "\n".join(lines)

    def write(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "title": self.title, "quick": self.quick, "started": self.started,
            "duration_secs": time.time() - self.started, "environment": environment(),
            "figures": [f.to_dict() for f in self.figures], "series": self.series,
            "plots": self.plots, "profiles": self.profiles, "notes": self.notes,
        }
        (self.out_dir / "report.json").write_text(json.dumps(doc, indent=1, default=str))
        md = [f"# {self.title}", "",
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"
              f"{' (quick)' if self.quick else ''}, {environment()['cpus']} CPUs, Python {platform.python_version()}."
              " Ratios are measured side by side in this run; targets are from issues 3 and 6.", "",
              self.markdown_table(), ""]
        if self.notes:
            md += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.plots:
            md += ["## Plots", ""] + [f"![{p}]({p})" for p in self.plots] + [""]
        if self.profiles:
            md += ["## Profiles", "", "Open with `python -m pstats FILE`; the top 25 by cumulative time is "
                   "beside each as .txt.", ""] + [f"- {p}" for p in self.profiles] + [""]
        (self.out_dir / "report.md").write_text("\n".join(md))
        return self.out_dir


def environment() -> dict:
    import rocksdict  # noqa: F401  (version below)
    from importlib.metadata import version
    env = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("rocksdict", "pyzmq", "msgpack", "redis"):
        try:
            env[pkg] = version(pkg)
        except Exception:
            env[pkg] = None
    return env


# -- profiling -------------------------------------------------------------------------------

@contextlib.contextmanager
def profiled(report: Report, name: str, enabled: bool = True):
    """cProfile the block; save <name>.prof and the top 25 (cumulative) as <name>.txt."""
    if not enabled:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        report.out_dir.mkdir(parents=True, exist_ok=True)
        path = report.out_dir / f"{name}.prof"
        prof.dump_stats(path)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(15)
        (report.out_dir / f"{name}.txt").write_text(text.getvalue())
        report.profiles.append(path.name)


def top_functions(prof_path: Path, n: int = 5) -> list[tuple[str, float]]:
    """(function, tottime share) of the n most expensive functions in a saved profile."""
    stats = pstats.Stats(str(prof_path))
    total = sum(v[2] for v in stats.stats.values()) or 1.0
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [(f"{os.path.basename(k[0])}:{k[1]}({k[2]})", v[2] / total) for k, v in rows]


# -- misc --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int | None = None) -> int:
    import psutil
    return psutil.Process(pid or os.getpid()).memory_info().rss


def timestamp_dir(base: Path | None = None) -> Path:
    base = base or (ROOT / "reports")
    return base / time.strftime("%Y%m%d-%H%M%S")


def caller_path(path: Path) -> Path:
    """A path given on the command line, relative to the directory the user ran the
    script from (scripts/bench and scripts/soak cd to the repo root first and name it in
    SHARDKV_CALLER_CWD), as scripts/node treats its own paths."""
    return Path(os.environ.get("SHARDKV_CALLER_CWD", ".")) / path


def plot_lines(report: Report, filename: str, title: str, xlabel: str, series: dict[str, tuple[list, list]],
               ylabel: str, y2: dict[str, tuple[list, list]] | None = None, y2label: str = "",
               logx: bool = False) -> None:
    """One PNG with a line per series (and optional second y axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 50 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if y2:
        ax2 = ax.twinx()
        for label, (xs, ys) in y2.items():
            ax2.plot(xs, ys, label=label, color="tab:red", alpha=0.6, linestyle="--")
        ax2.set_ylabel(y2label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best", fontsize=8)
    fig.tight_layout()
    report.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.out_dir / filename, dpi=90)
    plt.close(fig)
    report.plots.append(filename)


def plot_bars(report: Report, filename: str, title: str, bars: dict[str, float], ylabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(bars)
    ax.bar(range(len(names)), [bars[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    report.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.out_dir / filename, dpi=90)
    plt.close(fig)
    report.plots.append(filename)


def best_of(n: int, fn):
    """Run fn() n times and return the best (max) result: noise on a shared box only slows."""
    return max(fn() for _ in range(n))
