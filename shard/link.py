"""Router <-> shard transport: length-prefixed frames over a Unix domain stream socket.

The client side of the node is ZeroMQ (PROTOCOL.md); this internal hop is not. A ZeroMQ
message crosses an I/O thread on each side, and on the 2-core machine a DEALER/ROUTER
round trip between two processes measured ~100 us against ~10 us for a plain Unix socket
(MEASUREMENTS.md has the ipc echo figure). A single-shard txn makes one such round trip,
a cross-shard one two, so the hop was most of the node's latency.

Frame = 4-byte big-endian payload length + payload (one msgpack message, shard/messages.py).
Sockets are non-blocking: a send that does not fit the kernel buffer is queued and
written when the socket turns writable (`poll_flags` asks for POLLOUT then), so neither
side ever blocks on a slow or stopped peer.

The shard listens (`FrameListener`, one stream per connected peer: the router, or a test);
the router connects (`connect`) and reconnects after the shard restarts.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import time

import zmq

HEADER = struct.Struct(">I")
# Plain ints: zmq.POLLIN/POLLOUT are IntFlag enums, whose `|` and `&` run Python code.
POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
MAX_FRAME = 1 << 30            # a length above this is garbage: the stream is dropped
READ_CHUNK = 1 << 18
READ_BUDGET = 16 << 20         # bytes read per read_frames() call: one loop pass's share


class FrameStream:
    """One connected peer. `read_frames()` returns the complete frames received so far;
    `send()` never blocks; `closed` turns true on EOF, a socket error or a bad length."""

    __slots__ = ("sock", "fd", "inbuf", "outbuf", "closed", "poller", "registered", "out_cap")

    def __init__(self, sock: socket.socket, out_cap: int = 0):
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()    # the key of this stream in zmq.Poller events (an int)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False
        self.poller = None         # the poller this stream is registered with, if any
        self.registered = 0        # ...and with which flags
        # Backpressure (0: none): above this many unsent bytes the stream stops asking
        # for input (poll_flags) and its owner stops reading it (`backlogged`), so a peer
        # that sends requests but reads no replies cannot grow this process's memory
        # without bound: it fills its own socket buffer and blocks instead.
        self.out_cap = out_cap

    def fileno(self) -> int:
        return self.fd

    # ---------------------------------------------------------------- sending

    def send(self, frame: bytes) -> bool:
        """Queue one frame; False when the stream is closed (the frame is dropped)."""
        if self.closed:
            return False
        header = HEADER.pack(len(frame))
        if self.outbuf:            # keep frame order: append behind what is queued
            self.outbuf += header
            self.outbuf += frame
            return True
        try:
            sent = self.sock.sendmsg((header, frame))
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return False
        total = len(header) + len(frame)
        if sent < total:
            if sent < len(header):
                self.outbuf += header[sent:]
                self.outbuf += frame
            else:
                self.outbuf += memoryview(frame)[sent - len(header):]
        return True

    def flush_out(self) -> None:
        """Write what send() had to queue (call when the socket is writable)."""
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            del self.outbuf[:sent]

    # ---------------------------------------------------------------- receiving

    def read_frames(self) -> list[bytes]:
        """Read what the socket holds (up to READ_BUDGET bytes) and return every complete
        frame. EOF or an error marks the stream closed after the frames before it."""
        buf = self.inbuf
        budget = READ_BUDGET
        while budget > 0 and not self.closed:
            try:
                data = self.sock.recv(READ_CHUNK)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                self.close()
                break
            if not data:
                self.close()
                break
            buf += data
            budget -= len(data)
            if len(data) < READ_CHUNK:
                break              # drained for now: skip the extra recv that says EAGAIN
        frames = []
        start, end = 0, len(buf)
        unpack = HEADER.unpack_from
        with memoryview(buf) as view:      # released before `del` resizes the buffer
            while end - start >= 4:
                (n,) = unpack(view, start)
                if n > MAX_FRAME:
                    self.close()
                    break
                if end - start - 4 < n:
                    break
                frames.append(bytes(view[start + 4:start + 4 + n]))
                start += 4 + n
        if start:
            del buf[:start]
        return frames

    # ---------------------------------------------------------------- lifecycle

    @property
    def backlogged(self) -> bool:
        """More unsent bytes than out_cap: read nothing from the peer until they drain."""
        return 0 < self.out_cap < len(self.outbuf)

    def poll_flags(self) -> int:
        if not self.outbuf:
            return POLLIN
        return POLLOUT if 0 < self.out_cap < len(self.outbuf) else POLLOUT | POLLIN

    def sync_poller(self, poller: zmq.Poller) -> None:
        """(Re)register `fd` with the flags the stream needs now (POLLOUT only while
        something is queued). zmq.Poller reports plain descriptors by number, so the
        owner looks streams up by `fd` in the events."""
        if self.closed:
            return
        flags = self.poll_flags()
        if flags != self.registered:
            poller.register(self.fd, flags)
            self.poller, self.registered = poller, flags

    def close(self) -> None:
        """Close, leaving the poller first: its fd number may be reused by the next socket."""
        if self.closed:
            return
        self.closed = True
        self.outbuf.clear()
        if self.poller is not None:
            try:
                self.poller.unregister(self.fd)
            except KeyError:
                pass
            self.poller, self.registered = None, 0
        try:
            self.sock.close()
        except OSError:
            pass


def connect(path: str) -> FrameStream | None:
    """A stream to the shard listening at `path`, or None when nobody listens (yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
            return None
        raise
    return FrameStream(sock)


class FrameListener:
    """The shard's listening socket. Binding removes a stale socket file first (left by a
    killed incarnation of the same shard; the supervisor runs one process per shard)."""

    def __init__(self, path: str, backlog: int = 16, out_cap: int = 0):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.out_cap = out_cap     # of every accepted stream (FrameStream.out_cap)

    def fileno(self) -> int:
        return self.fd

    def accept(self) -> list[FrameStream]:
        streams = []
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return streams
            except OSError:
                return streams     # e.g. EMFILE: leave it queued, try on the next pass
            streams.append(FrameStream(sock, self.out_cap))

    def close(self) -> None:
        self.sock.close()


class FrameClient:
    """A blocking request/reply connection to a shard, for tools and tests (the router
    uses FrameStream directly, inside its poll loop)."""

    def __init__(self, path: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            stream = connect(path)
            if stream is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no shard listening at {path}")
            time.sleep(0.02)
        self.stream = stream
        self.timeout = timeout
        self.pending: list[bytes] = []

    def send(self, frame: bytes) -> None:
        if not self.stream.send(frame):
            raise ConnectionError("shard connection closed")
        self._write_all(time.monotonic() + self.timeout)

    def _write_all(self, deadline: float) -> None:
        poller = zmq.Poller()
        while self.stream.outbuf:
            poller.register(self.stream.fd, POLLOUT)
            if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError("shard does not take the frame")
            self.stream.flush_out()
        if self.stream.closed:
            raise ConnectionError("shard connection closed")

    def poll(self, timeout_ms: int) -> bool:
        """True when a frame is ready (within timeout_ms)."""
        if self.pending:
            return True
        deadline = time.monotonic() + timeout_ms / 1000
        poller = zmq.Poller()
        poller.register(self.stream.fd, POLLIN)
        while not self.pending:
            left = deadline - time.monotonic()
            if left < 0 or not poller.poll(int(left * 1000)):
                return bool(self.pending)
            self.pending.extend(self.stream.read_frames())
            if self.stream.closed and not self.pending:
                raise ConnectionError("shard connection closed")
        return True

    def recv(self) -> bytes:
        if not self.poll(int(self.timeout * 1000)):
            raise TimeoutError(f"no frame within {self.timeout} s")
        return self.pending.pop(0)

    def close(self) -> None:
        self.stream.close()
