"""Stand-in shard worker / router speaking the supervisor status protocol.

Run as `python -m fake_child --spec JSON` (tests put this directory on PYTHONPATH and set
SHARDKV_SHARD_MODULE / SHARDKV_ROUTER_MODULE). Misbehaviour is chosen per child with env
vars naming "role:shard" (router: "router:"), e.g. FAKE_FATAL="shard:1":
  FAKE_FATAL          send {"kind": "fatal"} and exit 78
  FAKE_CRASH_EARLY    exit 3 before reporting ready
  FAKE_HANG           first incarnation stops sending status after ready
  FAKE_IGNORE_TERM    ignore SIGTERM
  FAKE_SLOW_ORPHAN    once orphaned, take 60 s to exit (a shard flushing after its
                      supervisor was killed)
FAKE_EVENTS (a file) gets one line per event: "<who> <event> <pid> <monotonic time>".
The fake router binds node.listen and answers `ping` like the real one.
"""
import argparse
import ctypes
import json
import os
import signal
import sys
import time

import msgpack
import zmq

PR_SET_PDEATHSIG = 1


def picked(var: str, who: str) -> bool:
    return who in os.environ.get(var, "").split(",")


def event(who: str, what: str) -> None:
    path = os.environ.get("FAKE_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{who} {what} {os.getpid()} {time.monotonic()}\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(parser.parse_args().spec)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = os.getppid()
    role, shard = spec["role"], spec.get("shard")
    who = f"{role}:{'' if shard is None else shard}"
    ident = {"role": role, "pid": os.getpid(), **({"shard": shard} if role == "shard" else {})}
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):   # like the real children: both mean stop
        if picked("FAKE_IGNORE_TERM", who):
            signal.signal(sig, signal.SIG_IGN)
        else:
            signal.signal(sig, lambda *_: stopping.append(1))
    event(who, "start")

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{spec['run_dir']}/supervisor.sock")
    status = lambda kind, **kw: push.send(msgpack.packb({"kind": kind, **ident, **kw}))
    if picked("FAKE_FATAL", who):
        status("fatal", error="fake boot failure: disk on fire")
        push.close(linger=2000)
        ctx.term()
        return 78
    if picked("FAKE_CRASH_EARLY", who):
        return 3
    front = None
    if role == "router":
        front = ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 0)
        front.bind(spec["config"]["node"]["listen"])
    status("ready")
    event(who, "ready")
    hang = picked("FAKE_HANG", who) and spec.get("restarts", 0) == 0
    interval = spec["config"]["supervisor"]["stats_interval_secs"]
    poller = zmq.Poller()
    if front is not None:
        poller.register(front, zmq.POLLIN)
    next_stats = 0.0
    while not stopping:
        if os.getppid() != parent:
            event(who, "orphaned")
            if picked("FAKE_SLOW_ORPHAN", who):
                time.sleep(60)
            break
        if poller.poll(50) and front is not None:
            *envelope, frame = front.recv_multipart()
            req = msgpack.unpackb(frame)
            reply = {"id": req.get("id"), "ok": True, "version": 1, "shards": spec["shards"], "ts": 0}
            front.send_multipart([*envelope, msgpack.packb(reply)])
        if not hang and time.monotonic() >= next_stats:
            status("stats", snapshot={**ident, "ts": time.time(), "restarts": spec.get("restarts", 0)})
            next_stats = time.monotonic() + interval
    event(who, "stop")
    push.close(linger=0)
    if front is not None:
        front.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
