"""A stand-in for the router's connection to a ShardWorker in the test's own process:
handle_frame and finish_pass send to it as to a FrameStream, and it keeps every reply."""
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
