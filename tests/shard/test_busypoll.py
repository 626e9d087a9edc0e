"""BusyPoller: zero-timeout polls (and a yield of the CPU when nothing came) for a window
after the last event, blocking polls otherwise. A real zmq.Poller over a real socket;
the clock is a counter the test moves, so the window is exact."""
import socket

import pytest
import zmq

from shard.busypoll import DEFAULT_WINDOW_US, BusyPoller, busy_poll_secs
from shard.worker import ShardWorker


class RecordingPoller:
    """A real zmq.Poller that records the timeout of every poll."""

    def __init__(self):
        self.poller = zmq.Poller()
        self.timeouts = []

    def register(self, *args):
        self.poller.register(*args)

    def poll(self, timeout):
        self.timeouts.append(timeout)
        return self.poller.poll(timeout)


@pytest.fixture
def polled():
    a, b = socket.socketpair()
    poller = RecordingPoller()
    poller.register(b.fileno(), zmq.POLLIN)
    now = [100.0]
    yields = []
    busy = BusyPoller(poller, 0.001, clock=lambda: now[0], yield_cpu=lambda: yields.append(now[0]))
    yield busy, poller, a, b, now, yields
    a.close()
    b.close()


def test_blocks_until_the_first_event_then_polls_without_sleeping_for_the_window(polled):
    busy, poller, a, b, now, yields = polled
    assert busy.poll(7) == {} and poller.timeouts == [7]          # nothing seen yet: a blocking poll
    a.send(b"x")
    assert busy.poll(7) == {b.fileno(): zmq.POLLIN}
    b.recv(1)
    now[0] += 0.0009                                              # inside the window
    assert busy.poll(7) == {} and poller.timeouts[-1] == 0
    assert yields == [now[0]]                                     # an empty spin gives the CPU away
    a.send(b"y")
    assert busy.poll(7) == {b.fileno(): zmq.POLLIN} and poller.timeouts[-1] == 0
    b.recv(1)
    now[0] += 0.0009                                              # the new event moved the window
    busy.poll(7)
    assert poller.timeouts[-1] == 0 and len(yields) == 2
    now[0] += 0.0002                                              # past it: blocking again
    busy.poll(7)
    assert poller.timeouts[-1] == 7 and len(yields) == 2


def test_a_zero_timeout_is_not_a_spin(polled):
    """The loop asked for poll(0) itself (background work pending): nothing to yield for."""
    busy, poller, a, b, now, yields = polled
    a.send(b"x")
    busy.poll(0)
    b.recv(1)
    assert busy.poll(0) == {} and poller.timeouts == [0, 0] and yields == []


def test_window_zero_always_blocks(polled):
    busy, poller, a, b, now, yields = polled
    busy.window = 0.0
    a.send(b"x")
    busy.poll(5)
    b.recv(1)
    busy.poll(5)
    assert poller.timeouts == [5, 5] and yields == []


def test_the_window_comes_from_node_busy_poll_us(tmp_path):
    assert busy_poll_secs({}) == DEFAULT_WINDOW_US / 1e6
    assert busy_poll_secs({"node": {"busy_poll_us": 0}}) == 0.0
    w = ShardWorker({"shard": 0, "shards": 1, "data_dir": str(tmp_path / "data"),
                     "run_dir": str(tmp_path), "config": {"node": {"busy_poll_us": 250}}})
    assert w.busy_poll_secs == 0.00025


def test_spin_false_blocks_inside_the_window(polled):
    """The shard's wait between paced background slices is deliberate (it leaves the CPU
    to the other processes): no busy polling then."""
    busy, poller, a, b, now, yields = polled
    a.send(b"x")
    busy.poll(7)
    b.recv(1)
    busy.poll(7, spin=False)
    assert poller.timeouts == [7, 7] and yields == []
