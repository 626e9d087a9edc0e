"""The supervisor's HTTP endpoint: GET /metrics and GET /healthz, from cached state.

Runs in a daemon thread; every request reads MetricsState (a lock held for a copy),
so a dead or slow child can never stall a scrape. A connection is a thread and an fd of
the supervisor, which needs fds to respawn children: a client gets REQUEST_TIMEOUT_SECS
per read or write, and connections beyond MAX_CONNECTIONS are closed at once.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from supervisor.metrics import MetricsState, make_registry

REQUEST_TIMEOUT_SECS = 10.0   # per socket read or write of one connection
MAX_CONNECTIONS = 64          # open at once; Prometheus needs one per scrape
ACCEPT_BACKOFF_SECS = 0.1     # out of fds: the listener stays readable, do not spin on it


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsServer"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout   # read by StreamRequestHandler.setup
        super().setup()

    def parse_request(self) -> bool:
        # A request line without a version (HTTP/0.9, "GET /metrics") has no headers, yet
        # http.server waits for them until the timeout: refuse it at once.
        if len(self.raw_requestline.split()) == 2:
            self.command, self.request_version = None, "HTTP/1.0"
            self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
            self.close_connection = True
            self.send_error(400, "the request line needs an HTTP version")
            return False
        return super().parse_request()

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

    def __init__(self, address, state: MetricsState, request_timeout=REQUEST_TIMEOUT_SECS,
                 max_connections=MAX_CONNECTIONS):
        # node.metrics_host may be an IPv6 address ("::1"): it passed the config check and
        # then failed at start on an IPv4 socket
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.state = state
        self.registry = make_registry(state)
        self.thread: threading.Thread | None = None
        self.request_timeout = request_timeout
        self.slots = threading.BoundedSemaphore(max_connections)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(ACCEPT_BACKOFF_SECS)
            raise   # socketserver drops the failed accept and polls again

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)   # over the cap: closed unanswered
            return
        try:
            super().process_request(request, client_address)   # starts its thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        if self.thread is not None and self.thread.is_alive():
            super().shutdown()
            self.thread.join(timeout=5)
        self.server_close()


def start_metrics_server(host: str, port: int, state: MetricsState, **limits) -> MetricsServer:
    """Bind host:port (port 0 = any free port, see `.port`) and serve in a daemon thread;
    `limits`: request_timeout, max_connections. Raises OSError when the port is taken."""
    server = MetricsServer((host, port), state, **limits)
    server.thread = threading.Thread(target=server.serve_forever, name="shardkv-metrics-http",
                                     kwargs={"poll_interval": 0.2}, daemon=True)
    server.thread.start()
    return server
