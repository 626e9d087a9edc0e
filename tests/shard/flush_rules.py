"""Flush rules shared by the engine's state-machine tests: a whole flush, a flush left
running for a few steps while the machine's other rules go on (as the worker interleaves
flush steps with requests), and the freeing of flushed memtables a slice at a time."""
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

    @rule(versions=st.integers(1, 4))
    def free_flushed_partly(self, versions):
        # Flushed memtables are freed a slice per loop pass (engine.release_step), with
        # the machine's reads, commits and prunes between slices, as in the worker.
        self.engine.release_step(versions=versions)
