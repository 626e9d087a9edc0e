"""Protocol fuzz against a real node: thousands of random and malformed frames from
DEALER and REQ sockets, then the node must still answer and hold exactly the data it
held before, and no checkpoint directory may have escaped the data dir.

Frames that our own validator (node.protocol) accepts as a *mutating* request are never
sent, so "data unchanged" is a fair expectation for everything that is sent. Every
single-frame message must get exactly one reply, echoing the id the validator finds in
it (null when the frame cannot be parsed)."""
from __future__ import annotations

import collections
import os
import random
import signal
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import zmq

from node.client import Client
from node.protocol import Limits, ProtocolError, decode_request

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FUZZ_SECONDS = 20.0          # hard bound on the sending phase
DEALER_FRAMES = 10000
REQ_FRAMES = 500
WINDOW = 200                 # DEALER requests in flight before draining replies
MUTATING = {"txn", "batch", "block", "flush", "prune", "checkpoint"}
ALLOWED_CODES = {"bad_request", "too_large", "too_old"}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class FrameFactory:
    """Deterministic (seeded) generator of hostile frames, by category."""

    def __init__(self, seed: int, escape_tag: str):
        self.rng = random.Random(seed)
        self.tag = escape_tag

    def scalar(self):
        r = self.rng
        return r.choice([None, True, False, r.randint(-2**63, 2**64 - 1), r.random() * 1e6,
                         -0.0, float("inf"), r.randbytes(r.randint(0, 12)),
                         "".join(chr(r.randint(0, 0x2FF)) for _ in range(r.randint(0, 8)))])

    def value(self, depth=0):
        r = self.rng
        roll = r.random()
        if depth > 3 or roll < 0.6:
            return self.scalar()
        if roll < 0.8:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.scalar() if r.random() < 0.2 else r.choice(FIELDS): self.value(depth + 1)
                for _ in range(r.randint(0, 3)) if True}

    def random_bytes(self):
        return self.rng.randbytes(self.rng.randint(0, 300))

    def wrong_types(self):
        r = self.rng
        msg = {"op": r.choice(OPS_SEEN), "id": self.scalar() if r.random() < 0.9 else [1]}
        for _ in range(r.randint(0, 5)):
            msg[r.choice(FIELDS)] = self.value()
        try:
            return pack(msg)
        except (TypeError, ValueError):     # unhashable keys etc.: send something else
            return self.random_bytes()

    def valid_read(self):
        r = self.rng
        keys = [f"seed/{r.randint(0, 300)}".encode() for _ in range(r.randint(1, 5))]
        return pack(r.choice([
            {"op": "get", "id": r.randint(0, 10**9), "keys": keys},
            {"op": "scan", "id": str(r.random()), "prefix": b"seed/", "limit": r.randint(1, 50)},
            {"op": "ping", "id": None}, {"op": "stats", "id": b"\x00"}]))

    def truncated(self):
        frame = self.valid_read()
        return frame[:self.rng.randint(0, len(frame) - 1)]

    def corrupted(self):
        frame = bytearray(self.valid_read())
        for _ in range(self.rng.randint(1, 4)):
            frame[self.rng.randrange(len(frame))] = self.rng.randrange(256)
        return bytes(frame)

    def huge_lengths(self):
        r = self.rng
        header = r.choice([b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9"])  # array/map/bin/str/ext 32
        decl = header + struct.pack(">I", r.choice([2**32 - 1, 2**31, 10**9, 2**24]))
        field = r.choice(["keys", "writes", "reads", "txns", "id", "op", "name", "start"])
        return (b"\x83" + pack("op") + pack(r.choice(OPS_SEEN)) + pack("id") + pack(7)
                + pack(field) + decl + r.randbytes(r.randint(0, 16)))

    def deep_nesting(self):
        r = self.rng
        depth = r.choice([500, 1100, 5000, 100_000])
        opener = r.choice([b"\x91", b"\x81\xa1k"])
        nested = opener * depth + b"\xc0"
        return (b"\x83" + pack("op") + pack(r.choice(OPS_SEEN)) + pack("id") + pack(8)
                + pack(r.choice(FIELDS)) + nested)

    def checkpoint_names(self):
        r = self.rng
        names = [f"../{self.tag}", f"../../{self.tag}", f"/tmp/{self.tag}", f"a/../../{self.tag}",
                 f"{self.tag}/x", "..", ".", "", "a" * 70, f"..\\{self.tag}", f"{self.tag}\x00",
                 f"~/{self.tag}", f"-{self.tag}", f".{self.tag}", f"{self.tag}\n", b"bin-name",
                 17, None if r.random() < 0.5 else [self.tag]]
        return pack({"op": "checkpoint", "id": r.randint(0, 99),
                     "action": r.choice(["create", "delete", "create", "restore", 3]),
                     "name": r.choice(names)})

    def next(self):
        kind = self.rng.choices(
            [self.random_bytes, self.wrong_types, self.truncated, self.corrupted,
             self.huge_lengths, self.deep_nesting, self.checkpoint_names, self.valid_read],
            weights=[20, 30, 10, 15, 8, 4, 8, 5])[0]
        return kind()


FIELDS = ["op", "id", "keys", "at", "reads", "writes", "block", "txns", "start", "end",
          "prefix", "limit", "height", "keep_versions", "action", "name"]
OPS_SEEN = ["ping", "get", "txn", "batch", "scan", "block", "flush", "prune", "checkpoint",
            "stats", "nope", "", "GET"]


def expected_id(frame: bytes, limits: Limits):
    """The id the node must echo, or None-marker 'skip' for frames we must not send."""
    try:
        req = decode_request(frame, limits)
    except ProtocolError as exc:
        return exc.id
    if req["op"] in MUTATING:
        return "skip"
    return req["id"]


def drain(sock, count: int, deadline: float) -> list[dict]:
    replies = []
    while len(replies) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"node answered only {len(replies)} of {count} frames in time"
        if sock.poll(int(min(remaining, 10.0) * 1000)):
            replies.append(msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False))
    return replies


def check_envelope(reply: dict) -> None:
    assert isinstance(reply, dict) and reply.get("ok") in (True, False), reply
    if reply["ok"] is False:
        err = reply["error"]
        assert err["code"] in ALLOWED_CODES, err
        assert isinstance(err["message"], str) and isinstance(err["retryable"], bool)


def seed(kv: Client) -> None:
    for start in range(0, 300, 100):
        kv.txn(writes=[(f"seed/{i}", f"value-{i}".encode() * (i % 7 + 1))
                       for i in range(start, start + 100)])
    kv.txn(writes=[(f"seed/{i}", None) for i in range(0, 300, 10)])          # some deletes
    kv.txn(writes=[(f"seed/{i}", b"\x00\xffv2") for i in range(5, 300, 25)])  # second versions


def snapshot(kv: Client) -> tuple:
    keys = [f"seed/{i}".encode() for i in range(300)]
    got = kv.get(keys)
    return list(got), list(kv.scan_iter(page=97))


class NodeProcess:
    """`scripts/node` on free ports with a data dir two levels below tmp_path (so a
    checkpoint name climbing out with ../.. still lands under tmp_path, where we look)."""

    def __init__(self, tmp_path: Path):
        self.data_dir = tmp_path / "node" / "data"
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.limits = Limits()      # configs/node.toml defaults
        self.log = open(tmp_path / "node.log", "wb")
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "node"), "--data-dir", str(self.data_dir), "--shards", "2",
             "--listen", self.endpoint, "--metrics-port", str(free_port())],
            stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT)
        deadline = time.monotonic() + 60
        line = b""
        while b"ready" not in line:
            assert time.monotonic() < deadline and self.proc.poll() is None, \
                f"node did not start: {(tmp_path / 'node.log').read_text()[-3000:]}"
            line = self.proc.stdout.readline()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh_node(tmp_path):
    node = NodeProcess(tmp_path)
    yield node
    assert node.stop() == 0, "node did not stop gracefully after the fuzz"


def test_fuzz_frames_change_nothing(fresh_node, tmp_path):
    node = fresh_node
    limits = node.limits
    tag = f"escaped-{uuid.uuid4().hex[:10]}"
    factory = FrameFactory(seed=int(os.environ.get("SHARDKV_FUZZ_SEED", "1234")), escape_tag=tag)

    with Client(node.endpoint, timeout=10) as kv:
        seed(kv)
        before = snapshot(kv)
        checkpoints_before = kv.checkpoint_list()

    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(node.endpoint)
    sent_ids: collections.Counter = collections.Counter()
    got_ids: collections.Counter = collections.Counter()
    stop_at = time.monotonic() + FUZZ_SECONDS
    sent = skipped = 0
    try:
        while sent < DEALER_FRAMES and time.monotonic() < stop_at:
            batch = 0
            while batch < WINDOW and sent < DEALER_FRAMES:
                frame = factory.next()
                rid = expected_id(frame, limits)
                if rid == "skip":
                    skipped += 1
                    continue
                dealer.send(frame)
                sent_ids[repr(rid)] += 1
                batch += 1
                sent += 1
            for reply in drain(dealer, batch, time.monotonic() + 15):
                check_envelope(reply)
                got_ids[repr(reply.get("id"))] += 1

        # empty frames and multipart messages: answered (the router may echo the leading
        # frames as an envelope, REQ-style) or dropped, never fatal
        dealer.send(b"")
        dealer.send_multipart([pack({"op": "ping", "id": 1}), b"extra"])
        dealer.send_multipart([b"", b"", b"\xc1"])
        while dealer.poll(500):
            parts = dealer.recv_multipart()
            check_envelope(msgpack.unpackb(parts[-1], raw=False, strict_map_key=False))

        req_sent = 0
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(node.endpoint)
        while req_sent < REQ_FRAMES and time.monotonic() < stop_at + 10:
            frame = factory.next()
            if expected_id(frame, limits) == "skip":
                continue
            req.send(frame)
            assert req.poll(10_000), "no reply on the REQ socket"
            check_envelope(msgpack.unpackb(req.recv(), raw=False, strict_map_key=False))
            req_sent += 1
        req.close(linger=0)
    finally:
        dealer.close(linger=0)

    fuzz_secs = time.monotonic() - (stop_at - FUZZ_SECONDS)
    assert sent >= 500, f"only {sent} DEALER frames sent within the time bound"
    assert got_ids == sent_ids, "replies must echo exactly the ids of the frames sent"

    # frames just beyond max_frame_bytes are answered too_large (PROTOCOL.md); the router
    # drops only absurdly large ones at the transport (ZMQ_MAXMSGSIZE)
    oversized = []
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(node.endpoint)
    try:
        for frame in (pack({"op": "ping", "id": 5, "pad": b"x" * (limits.max_frame_bytes + 1)}),
                      b"\xc6" + struct.pack(">I", limits.max_frame_bytes + 10)
                      + b"\x00" * (limits.max_frame_bytes + 10)):
            big.send(frame)
            assert big.poll(10_000), "no too_large answer to an oversized frame"
            reply = msgpack.unpackb(big.recv(), raw=False, strict_map_key=False)
            assert reply["ok"] is False and reply["error"]["code"] == "too_large", reply
            oversized.append(reply["error"]["code"])
    finally:
        big.close(linger=0)

    with Client(node.endpoint, timeout=10) as kv:
        assert kv.ping()["version"] == 1
        assert snapshot(kv) == before
        assert kv.checkpoint_list() == checkpoints_before
    data_dir = Path(node.data_dir).resolve()
    escaped = [p for p in list(tmp_path.rglob(f"*{tag}*")) + list(Path("/tmp").glob(f"*{tag}*"))
               if data_dir not in p.resolve().parents]
    assert escaped == [], f"checkpoint paths escaped the data dir: {escaped}"
    ckpt_dir = data_dir / "checkpoints"
    if ckpt_dir.exists():
        assert sorted(p.name for p in ckpt_dir.iterdir() if tag in p.name) == []
    print(f"fuzz: {sent} DEALER + {req_sent} REQ frames in {fuzz_secs:.1f}s, {skipped} valid "
          f"mutating frames skipped, oversized frames: {oversized}")
