"""Flush rules shared by the engine's state-machine tests: a whole flush, and a flush
left running for a few steps while the machine's other rules go on (as the worker
interleaves flush steps with requests)."""
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule


class FlushRules(RuleBasedStateMachine):
    """Mixed into a machine that keeps its engine in `self.engine`."""

    @rule()
    def flush(self):
        self.engine.flush()

    @rule(steps=st.integers(0, 3))
    def flush_partly(self, steps):
        if self.engine.flush_job is None:
            self.engine.start_flush()
        for _ in range(steps):
            if self.engine.flush_step():
                break
