"""The supervisor's HTTP endpoint: GET /metrics and GET /healthz, from cached state.

Runs in a daemon thread; every request reads MetricsState (a lock held for a copy),
so a dead or slow child can never stall a scrape.
"""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from supervisor.metrics import MetricsState, make_registry


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception as exc:  # a bug in a collector must not kill the endpoint
                self._send(500, f"metrics collection failed: {exc!r}\n".encode())
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            down = self.server.state.down_parts()
            if down:
                self._send(503, ("down: " + ", ".join(down) + "\n").encode())
            else:
                self._send(200, b"ok\n")
        else:
            self._send(404, b"not found: try /metrics or /healthz\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # scrapes every second would flood stderr
        pass


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, state: MetricsState):
        # node.metrics_host may be an IPv6 address ("::1"): it passed the config check and
        # then failed at start on an IPv4 socket
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.state = state
        self.registry = make_registry(state)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        if self.thread is not None and self.thread.is_alive():
            super().shutdown()
            self.thread.join(timeout=5)
        self.server_close()


def start_metrics_server(host: str, port: int, state: MetricsState) -> MetricsServer:
    """Bind host:port (port 0 = any free port, see `.port`) and serve in a daemon thread.
    Raises OSError when the port is taken."""
    server = MetricsServer((host, port), state)
    server.thread = threading.Thread(target=server.serve_forever, name="shardkv-metrics-http",
                                     kwargs={"poll_interval": 0.2}, daemon=True)
    server.thread.start()
    return server
