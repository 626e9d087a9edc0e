"""A stand-in for the router's connection to a ShardWorker in the test's own process:
handle_frame and finish_pass send to it as to a FrameStream, and it keeps every reply.
send() and answer() drive a worker through it one message and one pass at a time."""
import time

from shard import messages as m


class Peer:
    fd = -1

    def __init__(self):
        self.replies = []

    def send(self, frame) -> bool:
        self.replies.extend(m.replies_of(m.unpack(frame)))
        return True

    def sync_poller(self, poller) -> None:
        pass

    def close(self) -> None:
        pass


def send(w, peer, msg, rid=None, inc=True):
    """One frame through handle_frame, then the pass's sync and replies (as loop_pass)."""
    if rid is not None:
        msg["rid"] = rid
    if inc:
        msg.setdefault("inc", w.inc)
    w.handle_frame(peer, m.pack(msg), time.monotonic())
    w.finish_pass()


def answer(peer, rid) -> dict:
    found = [r for r in peer.replies if r.get("rid") == rid]
    assert len(found) == 1, (rid, peer.replies)
    return found[0]
