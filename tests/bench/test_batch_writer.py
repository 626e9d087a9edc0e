"""Adaptive batch writer: the RSD policy in record(), config + env overrides, real writes."""
import csv

import pytest
import rocksdict

from shard.batch_writer import CSV_HEADER, AdaptiveBatchWriter, AdaptiveConfig, relative_stdev


def writer(**overrides) -> AdaptiveBatchWriter:
    return AdaptiveBatchWriter(AdaptiveConfig(**overrides))


def feed(w: AdaptiveBatchWriter, rates) -> list[str]:
    """Record one chunk per rate (ops/s) at the writer's current chunk size."""
    return [w.record(w.chunk_size, w.chunk_size / rate) for rate in rates]


# -- record(): the policy --------------------------------------------------------------------

def test_holds_until_the_window_is_full_then_grows_on_stable_throughput():
    w = writer(window=4)
    assert w.chunk_size == 1000
    assert feed(w, [100_000] * 3) == ["hold"] * 3
    assert w.chunk_size == 1000
    assert feed(w, [100_000]) == ["grow"]
    assert w.chunk_size == 1150            # +15%
    assert w.last_rsd == pytest.approx(0.0)


def test_keeps_growing_while_the_sliding_window_stays_stable():
    w = writer(window=3)
    decisions = feed(w, [50_000, 50_500, 49_800, 50_200, 50_100])
    assert decisions == ["hold", "hold", "grow", "grow", "grow"]
    assert w.chunk_size == round(round(round(1000 * 1.15) * 1.15) * 1.15)


def test_shrinks_on_noisy_throughput_and_needs_a_fresh_window_after():
    w = writer(window=4, min_chunk=100)
    w.chunk_size = 10_000
    decisions = feed(w, [100_000, 40_000, 120_000, 60_000])
    assert decisions == ["hold", "hold", "hold", "shrink"]
    assert w.chunk_size == 7000            # -30%
    # the noisy samples were dropped: three more chunks only fill the window again
    assert feed(w, [80_000] * 3) == ["hold"] * 3
    assert feed(w, [80_000]) == ["grow"]


def test_rsd_exactly_at_target_counts_as_stable():
    w = writer(window=2, target_rsd=0.25)
    # rates 75 and 125: mean 100, population stdev 25 -> RSD 0.25
    assert relative_stdev([75.0, 125.0]) == pytest.approx(0.25)
    assert feed(w, [75.0, 125.0]) == ["hold", "grow"]


def test_growth_is_capped_at_max_chunk_and_then_holds():
    w = writer(window=2, min_chunk=1000, max_chunk=1100)
    assert feed(w, [10_000, 10_000]) == ["hold", "grow"]
    assert w.chunk_size == 1100
    assert feed(w, [10_000] * 3) == ["hold"] * 3
    assert w.chunk_size == 1100


def test_shrink_is_floored_at_min_chunk_and_then_holds():
    w = writer(window=2, min_chunk=1000)
    w.chunk_size = 1200
    assert feed(w, [10_000, 30_000]) == ["hold", "shrink"]
    assert w.chunk_size == 1000
    assert feed(w, [10_000, 30_000]) == ["hold", "hold"]
    assert w.chunk_size == 1000


def test_tiny_chunks_can_still_grow():
    w = writer(window=2, min_chunk=1, max_chunk=10, adjust_up=0.15)
    feed(w, [1000, 1000])
    assert w.chunk_size == 2


def test_zero_duration_chunk_is_recorded_not_divided_by_zero():
    w = writer(window=2)
    assert w.record(1000, 0.0) == "hold"
    with pytest.raises(ValueError):
        w.record(-1, 0.1)
    with pytest.raises(ValueError):
        w.record(10, float("nan"))


def test_csv_trace_has_one_row_per_chunk(tmp_path):
    path = tmp_path / "trace.csv"
    w = writer(window=2, csv=str(path))
    feed(w, [1000, 1000, 1000])
    w.close()
    rows = list(csv.reader(path.open()))
    assert tuple(rows[0]) == CSV_HEADER
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert [r[1] for r in rows[1:]] == ["1000", "1000", "1150"]
    assert [r[4] for r in rows[1:]] == ["hold", "grow", "grow"]
    assert rows[1][3] == ""                 # window not full yet: no RSD
    assert float(rows[2][3]) == pytest.approx(0.0)
    assert float(rows[1][2]) == pytest.approx(1000.0)


# -- configuration ---------------------------------------------------------------------------

def test_defaults_are_the_original_projects():
    c = AdaptiveConfig.from_dict(None, environ={})
    assert (c.min_chunk, c.max_chunk, c.target_rsd, c.adjust_up, c.adjust_down, c.window, c.csv) == \
        (1000, 8000, 0.08, 0.15, 0.30, 6, "")


def test_config_section_then_env_overrides():
    section = {"min_chunk": 500, "max_chunk": 5000, "window": 4, "adjust_up": 0.2}
    env = {"SHARDKV_ADAPT_MAX_CHUNK": "9000", "SHARDKV_ADAPT_UP_PCT": "25",
           "SHARDKV_ADAPT_DOWN_PCT": "40%", "SHARDKV_ADAPT_TARGET_RSD": "5%",
           "SHARDKV_ADAPT_WINDOW": "8", "SHARDKV_ADAPT_CSV": "/tmp/x.csv"}
    c = AdaptiveConfig.from_dict(section, environ=env)
    assert c.min_chunk == 500                     # from the section
    assert c.max_chunk == 9000                    # env wins
    assert c.adjust_up == pytest.approx(0.25)     # "25" means 25%
    assert c.adjust_down == pytest.approx(0.40)
    assert c.target_rsd == pytest.approx(0.05)
    assert c.window == 8
    assert c.csv == "/tmp/x.csv"


def test_pct_below_one_is_a_fraction():
    c = AdaptiveConfig.from_dict({}, environ={"SHARDKV_ADAPT_UP_PCT": "0.1",
                                              "SHARDKV_ADAPT_TARGET_RSD": "0.12"})
    assert c.adjust_up == pytest.approx(0.1)
    assert c.target_rsd == pytest.approx(0.12)


@pytest.mark.parametrize("name,value", [
    ("SHARDKV_ADAPT_MIN_CHUNK", "ten"),
    ("SHARDKV_ADAPT_MIN_CHUNK", "0"),
    ("SHARDKV_ADAPT_MAX_CHUNK", "10"),          # below min_chunk 1000
    ("SHARDKV_ADAPT_WINDOW", "1"),
    ("SHARDKV_ADAPT_WINDOW", "2.5"),
    ("SHARDKV_ADAPT_TARGET_RSD", "-1"),
    ("SHARDKV_ADAPT_TARGET_RSD", "lots"),
    ("SHARDKV_ADAPT_UP_PCT", "fast"),
    ("SHARDKV_ADAPT_DOWN_PCT", "100"),          # shrinking by 100% leaves nothing
    ("SHARDKV_ADAPT_DOWN_PCT", ""),
])
def test_bad_env_value_names_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        AdaptiveConfig.from_dict({}, environ={name: value})


@pytest.mark.parametrize("section,field", [
    ({"min_chunk": "big"}, "batch_writer.min_chunk"),
    ({"window": 1}, "batch_writer.window"),
    ({"adjust_down": 1.5}, "batch_writer.adjust_down"),
    ({"max_chunk": 10}, "batch_writer.max_chunk"),
    ({"chunk": 10}, "batch_writer.chunk"),
])
def test_bad_config_value_names_the_key(section, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveConfig.from_dict(section, environ={})


# -- write(): real RocksDB --------------------------------------------------------------------

class RocksSink:
    """The minimal storage shape write() accepts: one WriteBatch per call."""

    def __init__(self, path):
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        self.db = rocksdict.Rdict(str(path), options=opts)
        self.batches = []

    def write_batch(self, rows, wal):
        batch = rocksdict.WriteBatch(raw_mode=True)
        for _cf, key, value in rows:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        wo = rocksdict.WriteOptions()
        wo.disable_wal = not wal
        self.db.write(batch, wo)
        self.batches.append(len(rows))


def test_write_chunks_rows_into_batches_and_counts_ops_and_bytes(tmp_path):
    sink = RocksSink(tmp_path / "db")
    w = writer(min_chunk=100, max_chunk=1000, window=2, target_rsd=10.0)  # always "stable"
    rows = [("data", b"k%05d" % i, b"v" * 10) for i in range(2000)]
    rows.append(("data", b"k00003", None))          # a delete travels too
    ops, nbytes = w.write(sink, rows, wal=False)
    assert ops == 2001
    assert nbytes == 2000 * (6 + 10) + 6
    assert sum(sink.batches) == 2001
    assert sink.batches[0] == 100                   # starts at min_chunk ...
    assert max(sink.batches) > 100                  # ... and grew on "stable" throughput
    assert all(size <= 1000 for size in sink.batches)
    assert w.chunks == len(sink.batches) - 1        # the short tail chunk does not vote
    assert sink.db[b"k01999"] == b"v" * 10
    assert sink.db.get(b"k00003") is None
    sink.db.close()


def test_write_accepts_batch_and_write_storage_shape():
    class Batch(list):
        def put(self, cf, key, value): self.append((cf, key, value))
        def delete(self, cf, key): self.append((cf, key, None))

    class Storage:
        def __init__(self): self.written = []
        def batch(self): return Batch()
        def write(self, batch, wal): self.written.append((list(batch), wal))

    s = Storage()
    ops, _ = writer(min_chunk=2).write(s, [("data", b"a", b"1"), ("data", b"b", None), ("log", b"c", b"")], wal=True)
    assert ops == 3
    assert s.written == [([("data", b"a", b"1"), ("data", b"b", None)], True), ([("log", b"c", b"")], True)]


def test_write_refuses_storage_without_a_batch_api():
    with pytest.raises(TypeError):
        writer().write(object(), [("data", b"a", b"1")], wal=False)


def test_csv_trace_creates_its_directory_and_an_unwritable_path_only_disables_it(tmp_path):
    nested = tmp_path / "a" / "b" / "trace.csv"
    w = writer(window=2, csv=str(nested))
    w.record(10, 0.001)
    w.close()
    assert nested.read_text().splitlines()[0] == ",".join(CSV_HEADER)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    w = writer(window=2, csv=str(blocker / "trace.csv"))      # parent is a file
    assert feed(w, [1000, 1000]) == ["hold", "grow"]           # still decides
    assert w.config.csv == ""
