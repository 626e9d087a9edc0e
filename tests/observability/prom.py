"""Test helpers: a real Prometheus via scripts/monitor, its HTTP API, dashboard queries."""
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")


def dashboard_queries(rate_interval: str = "15s", shard: str = ".*") -> list[tuple[str, str]]:
    """(panel title, expr) for every target of the Grafana dashboard, with Grafana's
    variables replaced as Grafana does: $shard -> .* for "All", else the shard regex."""
    board = json.loads((ROOT / "configs" / "grafana" / "shardkv.json").read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval).replace("$shard", shard)
            assert "$" not in expr, expr
            out.append((panel["title"], expr))
    return out


def api(base_url: str, path: str, **params) -> dict:
    """GET a Prometheus HTTP API path; returns `data` of a successful answer."""
    url = base_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def query(base_url: str, expr: str) -> list[dict]:
    return api(base_url, "/api/v1/query", query=expr)["result"]


def rule_names(base_url: str) -> set[str]:
    return {r["name"] for g in api(base_url, "/api/v1/rules")["groups"] for r in g["rules"]}


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll `condition()` until it returns a truthy value (returned) or fail after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except (OSError, AssertionError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@contextmanager
def monitor(metrics_port: int, scrape_interval: str = "1s"):
    """Run scripts/monitor against 127.0.0.1:metrics_port; yields Prometheus's base URL.
    On exit sends SIGINT (as Ctrl-C would) and checks it stops cleanly."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "monitor"),
                             "--metrics-port", str(metrics_port), "--scrape-interval", scrape_interval],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        line = wait_for(lambda: next((l for l in lines if "prometheus ready:" in l), None), 30,
                        "scripts/monitor to print its URL")
        # the alerts page it names must be there (Debian's Prometheus has only the classic
        # UI: /alerts was a 404 there)
        alerts = re.search(r"alerts at (\S+);", line).group(1)
        with urllib.request.urlopen(alerts, timeout=10) as page:
            assert page.status == 200 and b"ShardDown" in page.read(), alerts
        yield re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        stderr = proc.stderr.read()
    assert rc == 0, stderr
