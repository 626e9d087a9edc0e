"""The router <-> shard transport (shard/link.py) over real Unix sockets: frames arrive
whole and in order whatever the kernel buffers split, a send never blocks, and the end of
a peer or a garbage length is seen as `closed`."""
import os
import socket

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from shard.link import (HEADER, MAX_FRAME, POLLIN, POLLOUT, FrameClient, FrameListener,
                        FrameStream, connect)


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FrameStream(a), FrameStream(b)


def pump(sender: FrameStream, receiver: FrameStream, want: int, rounds: int = 10_000) -> list:
    """Move queued bytes across until `want` frames arrived (bounded)."""
    got = []
    for _ in range(rounds):
        sender.flush_out()
        got += receiver.read_frames()
        if len(got) >= want:
            return got
    raise AssertionError(f"only {len(got)} of {want} frames arrived")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=30))
def test_frames_arrive_whole_and_in_order(frames):
    a, b = pair()
    try:
        for f in frames:
            assert a.send(f)
        assert pump(a, b, len(frames)) == frames
    finally:
        a.close()
        b.close()


def test_a_frame_larger_than_the_socket_buffer_is_queued_not_blocking():
    a, b = pair()
    try:
        big = os.urandom(8 << 20)          # far above the default Unix socket buffer
        assert a.send(big)                 # returns at once: the rest is queued
        assert a.outbuf and a.poll_flags() == POLLIN | POLLOUT
        assert a.send(b"after")            # queued behind it, order kept
        assert pump(a, b, 2) == [big, b"after"]
        assert not a.outbuf and a.poll_flags() == POLLIN
    finally:
        a.close()
        b.close()


def test_peer_exit_is_seen_as_closed_after_the_frames_it_sent():
    a, b = pair()
    a.send(b"last words")
    a.close()
    got = []
    for _ in range(3):                    # EOF shows at the latest on the next read
        got += b.read_frames()
        if b.closed:
            break
    assert got == [b"last words"] and b.closed
    assert not b.send(b"to nobody")       # a closed stream drops, never raises


def test_a_garbage_length_closes_the_stream_and_keeps_earlier_frames():
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b = FrameStream(other)
    try:
        raw.sendall(HEADER.pack(2) + b"ok" + HEADER.pack(MAX_FRAME + 1) + b"x" * 16)
        assert b.read_frames() == [b"ok"]
        assert b.closed
    finally:
        raw.close()
        b.close()


def test_close_leaves_the_poller():
    a, b = pair()
    poller = zmq.Poller()
    b.sync_poller(poller)
    a.send(b"x")
    assert dict(poller.poll(1000)) == {b.fd: POLLIN}
    b.close()
    assert poller.poll(0) == []            # no stale (possibly reused) fd left behind
    a.close()


def test_listener_replaces_a_stale_socket_file_and_connect_waits_for_it(tmp_path):
    path = str(tmp_path / "shard-0.sock")
    assert connect(path) is None           # nobody listens yet: no error, just None
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)                       # what a SIGKILLed shard leaves behind
    stale.close()
    assert connect(path) is None           # the file exists but refuses
    listener = FrameListener(path)
    try:
        client = FrameClient(path, timeout=5)
        (server,) = listener.accept()
        client.send(b"ping")
        assert pump(server, server, 1) == [b"ping"]
        server.send(b"pong")
        assert client.recv() == b"pong"
        server.close()
        with pytest.raises(ConnectionError):
            client.recv()
        client.close()
    finally:
        listener.close()
