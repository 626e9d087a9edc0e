"""The list-append checker (tests/e2e/listappend.py) on small hand-made histories: each
anomaly it exists to find is found, with the txns involved, and a correct history of
the same shapes passes (so the live test's silence means something)."""
from tests.e2e.listappend import OK, REFUSED, UNKNOWN, History, Read, Txn, check

X, Y, Z = b"x", b"y", b"z"


def txn(element, reads, appends, outcome=OK, ts=None, sent=0.0, replied=None, batch=None):
    """reads: {key: (list, version)}; an acknowledged txn's replied defaults to sent."""
    if replied is None:
        replied = sent if outcome == OK else float("inf")
    return Txn(f"t{element}", element, reads, list(appends), outcome, ts, sent, replied, batch)


def kinds(history) -> set:
    return {a.kind for a in check(history)}


def involved(history, kind) -> set:
    return {name for a in check(history) if a.kind == kind for name in a.ops}


def serial_history() -> History:
    """t1 appends to x and y (ts 10), t2 reads both and appends to z (ts 20), t3 only
    reads (at 25); a read at 15 sees t1 only, one at 20 sees both."""
    t1 = txn(1, {X: ([], 0), Y: ([], 0)}, [X, Y], ts=10, sent=1.0)
    t2 = txn(2, {X: ([1], 10), Y: ([1], 10), Z: ([], 0)}, [Z], ts=20, sent=2.0)
    t3 = txn(3, {Z: ([2], 20)}, [], ts=25, sent=3.0)
    reads = [Read("r1", 15, {X: ([1], 10), Z: ([], 0)}, at=15, sent=0.5, replied=0.6),
             Read("r2", 20, {X: ([1], 10), Y: ([1], 10), Z: ([2], 20)}, sent=2.5, replied=2.6)]
    return History([t1, t2, t3], reads, {X: [1], Y: [1], Z: [2]})


def test_a_serial_history_has_no_anomaly():
    assert check(serial_history()) == []


def test_refused_and_absent_unknown_txns_are_fine():
    h = serial_history()
    h.txns.append(txn(4, {X: ([1], 10)}, [X], outcome=REFUSED, sent=4.0))
    h.txns.append(txn(5, {X: ([1], 10), Y: ([1], 10)}, [X, Y], outcome=UNKNOWN, sent=4.0))
    assert check(h) == []


def test_an_unknown_txn_present_everywhere_is_committed_and_checked():
    h = serial_history()
    h.txns.append(txn(5, {X: ([1], 10), Y: ([1], 10)}, [X, Y], outcome=UNKNOWN, sent=4.0))
    h.final[X], h.final[Y] = [1, 5], [1, 5]
    h.reads.append(Read("walk", 30, {X: ([1, 5], 30)}, at=30))
    assert check(h) == []
    h.reads.append(Read("early", 10, {X: ([1], 10), Y: ([1, 5], 30)}, sent=5.0, replied=5.1))
    assert "snapshot read" in kinds(h)      # t5 at 30 seen from a snapshot at 10


def test_an_element_whose_commit_ts_is_never_learnt_is_skipped_not_guessed():
    """Without the walk down the versions (pruned away), an unknown txn's ts may stay
    unknown: the checks that need it skip it rather than report what they cannot know."""
    t1 = txn(1, {X: ([], 0)}, [X], ts=10, sent=1.0)
    t2 = txn(2, {X: ([1], 10)}, [X], outcome=UNKNOWN, sent=2.0)
    reads = [Read("r1", 15, {X: ([1], 10)}, at=15), Read("r2", 40, {X: ([1, 2], 35)}, sent=3.0, replied=3.1)]
    assert check(History([t1, t2], reads, {X: [1, 2]})) == []
    assert check(History([t1, t2], reads[:1], {X: [1, 2]})) == []


def test_lost_update_two_appends_from_one_read():
    t1 = txn(1, {X: ([], 0)}, [X], ts=10)
    t2 = txn(2, {X: ([], 0)}, [X], ts=20)
    overwritten = History([t1, t2], [], {X: [2]})          # t2's write replaced t1's
    assert "lost write" in kinds(overwritten)
    both = History([t1, t2], [], {X: [1, 2]})              # both kept, but t2 read []
    assert {"lost update", "stale read"} <= kinds(both)
    assert "t2" in involved(both, "lost update")


def test_write_skew():
    """t1 and t2 each read x and y and append to a different one: not serializable."""
    t1 = txn(1, {X: ([], 0), Y: ([], 0)}, [X], ts=10)
    t2 = txn(2, {X: ([], 0), Y: ([], 0)}, [Y], ts=20)
    h = History([t1, t2], [], {X: [1], Y: [2]})
    assert kinds(h) == {"stale read"}
    assert involved(h, "stale read") == {"t1", "t2"}


def test_a_read_only_txn_that_missed_a_write():
    t1 = txn(1, {X: ([], 0)}, [X], ts=10)
    t2 = txn(2, {X: ([], 0)}, [], ts=12)                   # validated at 12, read x before t1
    assert involved(History([t1, t2], [], {X: [1]}), "stale read") == {"t1", "t2"}


def test_fractured_read_across_shards():
    t1 = txn(1, {X: ([], 0), Y: ([], 0)}, [X, Y], ts=10, sent=1.0)
    r = Read("r", 11, {X: ([1], 10), Y: ([], 0)}, sent=2.0, replied=2.1)
    h = History([t1], [r], {X: [1], Y: [1]})
    assert kinds(h) == {"snapshot read"}
    assert involved(h, "snapshot read") == {"r", "t1"}


def test_a_read_at_a_past_ts_that_shows_the_future():
    t1 = txn(1, {X: ([], 0)}, [X], ts=10)
    h = History([t1], [Read("r", 9, {X: ([1], 10)}, at=9)], {X: [1]})
    assert kinds(h) == {"snapshot read"}


def test_aborted_write_visible():
    t1 = txn(1, {X: ([], 0)}, [X], outcome=REFUSED)
    h = History([t1], [], {X: [1]})
    assert "aborted write visible" in kinds(h)
    assert involved(h, "aborted write visible") == {"t1"}


def test_partial_unknown_txn():
    t1 = txn(1, {X: ([], 0), Y: ([], 0)}, [X, Y], outcome=UNKNOWN)
    h = History([t1], [Read("w", 10, {X: ([1], 10)}, at=10)], {X: [1], Y: []})
    assert kinds(h) == {"partial txn"}


def test_real_time_inversion_between_txns():
    t1 = txn(1, {X: ([], 0)}, [X], ts=20, sent=1.0, replied=1.5)
    t2 = txn(2, {Y: ([], 0)}, [Y], ts=10, sent=2.0, replied=2.5)   # sent after t1's ack
    h = History([t1, t2], [], {X: [1], Y: [2]})
    assert kinds(h) == {"real time"}
    assert involved(h, "real time") == {"t1", "t2"}
    t2.sent = 1.2                       # concurrent with t1: any order is fine
    assert check(h) == []


def test_a_latest_get_that_misses_an_acknowledged_commit():
    t1 = txn(1, {X: ([], 0)}, [X], ts=20, sent=1.0, replied=1.5)
    stale = Read("r", 15, {Y: ([], 0)}, sent=2.0, replied=2.1)      # ts below t1's
    h = History([t1], [stale], {X: [1], Y: []})
    assert kinds(h) == {"real time"}
    stale.at = 15                         # an explicit old snapshot may be older
    assert check(h) == []


def test_a_write_after_a_read_needs_a_later_ts():
    r = Read("r", 20, {X: ([], 0)}, sent=1.0, replied=1.1)
    t1 = txn(1, {Y: ([], 0)}, [Y], ts=20, sent=2.0)                 # same ts as the read
    assert kinds(History([t1], [r], {X: [], Y: [1]})) == {"real time"}


def test_not_a_prefix_duplicates_garbage_and_misplaced_elements():
    t1 = txn(1, {X: ([], 0)}, [X], ts=10)
    t2 = txn(2, {X: ([1], 10)}, [X], ts=20)
    h = History([t1, t2], [Read("r", 30, {X: ([2], 20)}, at=30)], {X: [1, 2, 2, 9], Y: [1]})
    assert {"not a prefix", "duplicate", "garbage", "misplaced"} <= kinds(h)


def test_version_mismatch_and_duplicate_commit_ts():
    t1 = txn(1, {X: ([], 0)}, [X], ts=10)
    t2 = txn(2, {Y: ([], 0)}, [Y], ts=10)
    h = History([t1, t2], [Read("r", 30, {X: ([1], 11), Z: ([], 5)}, at=30)], {X: [1], Y: [2], Z: []})
    assert {"version mismatch", "duplicate commit_ts"} <= kinds(h)


def test_list_order_against_commit_ts():
    t1 = txn(1, {X: ([], 0)}, [X], ts=30, sent=0.0, replied=5.0)
    t2 = txn(2, {X: ([1], 30)}, [X], ts=20, sent=1.0, replied=5.0)
    assert "order" in kinds(History([t1, t2], [], {X: [1, 2]}))


def test_batch_entries_out_of_list_order():
    a = txn(1, {X: ([], 0)}, [X], ts=20, batch=("b1", 0))
    b = txn(2, {Y: ([], 0)}, [Y], ts=10, batch=("b1", 1))
    h = History([a, b], [], {X: [1], Y: [2]})
    assert kinds(h) == {"batch order"}
    b.batch = ("b2", 0)
    assert check(h) == []


def test_a_later_batch_entry_that_ignored_an_earlier_one():
    """Both entries read x = [] from one get; the first appended to x and committed, so
    the second (which appends to y) must have been refused."""
    a = txn(1, {X: ([], 0)}, [X], ts=10, batch=("b1", 0))
    b = txn(2, {X: ([], 0), Y: ([], 0)}, [Y], ts=11, batch=("b1", 1))
    assert involved(History([a, b], [], {X: [1], Y: [2]}), "stale read") == {"t1", "t2"}
