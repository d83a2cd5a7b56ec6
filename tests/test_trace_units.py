"""Instrumentation pieces with plain numbers and a tiny model: clocks, CUDA-event mapping,
pebble accounting, memory sampling, trace files. No MPI."""
import threading
import types

import pandas as pd
import pytest
import torch

from harness.trace import clock as C
from harness.trace import memory, pebbles, writer


def test_pingpong_recovers_offset_with_symmetric_latency():
    # remote clock = reference - 5000; one-way latency 300 each way
    t_send = 10_000
    t_remote = t_send + 300 - 5000
    off, rtt = C.offset_from_pingpong(t_send, t_remote, t_send + 600)
    assert (off, rtt) == (5000, 600)


def test_best_exchange_keeps_the_smallest_round_trip():
    true_off = 7000
    samples = []
    for lat_out, lat_back in [(900, 100), (100, 100), (50, 800)]:  # only the 2nd is symmetric
        t_send = 1_000_000
        samples.append((t_send, t_send + lat_out - true_off, t_send + lat_out + lat_back))
    best = C.best_exchange(samples)
    assert best["rtt_ns"] == 200 and best["offset_ns"] == true_off


def test_offset_interpolates_linearly_between_start_and_end():
    start = {"t_local": 0, "offset_ns": 100}
    end = {"t_local": 1000, "offset_ns": 300}
    assert C.interpolate_offset(500, start, end) == pytest.approx(200)
    assert C.interpolate_offset(0, start, None) == 100


def test_skewed_clock_knows_its_true_offset():
    clk = C.Clock(skew_ns=40_000_000, drift_ppm=250)
    t_host = clk.origin + 2_000_000_000  # 2 s after the clock was made
    local = t_host + 40_000_000 + int(250e-6 * 2e9)
    assert abs(clk.true_offset(local) - (t_host - local)) <= 1


def test_cuda_event_mapping_with_plain_numbers():
    # anchor event ran between host times 1000 and 3000 ns; an event 0.5 ms later
    assert C.event_to_host_ns(1000, 3000, 0.5) == 2000 + 500_000
    assert C.event_to_host_ns(1000, 3000, 0.0) == 2000


class FakeEvent:
    """Stands in for torch.cuda.Event: device time in ms, elapsed_time as torch defines it."""

    def __init__(self, t_ms):
        self.t_ms = t_ms

    def elapsed_time(self, other):
        return other.t_ms - self.t_ms


def test_cuda_timer_resolves_events_against_the_step_anchor():
    timer = C.CudaTimer.__new__(C.CudaTimer)
    synced = []
    timer.torch = types.SimpleNamespace(cuda=types.SimpleNamespace(synchronize=synced.append))
    timer.device = "cuda:0"
    timer.anchor = (10_000, 12_000, FakeEvent(5.0))  # host 10-12 us around device t=5 ms
    out = timer.resolve([FakeEvent(5.25), 123_456, FakeEvent(7.0)])
    assert out == [11_000 + 250_000, 123_456, 11_000 + 2_000_000]  # host ints pass through
    assert synced == ["cuda:0"], "resolving synchronises once, not per event"


def tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_pebbles_skip_parameters_count_shared_saves_once_and_free_after_backward():
    net = tiny()
    ticks = iter(range(1, 10**6))
    trk = pebbles.PebbleTracker(lambda: next(ticks), net.parameters())
    x = torch.randn(5, 8, requires_grad=True)
    with trk.hooks():
        out = net(x).sum()
    # saved: x (first Linear: needs it for dW), ReLU output (ReLU and second Linear share it).
    # Weights (W1^T, W2^T) are parameters and are skipped.
    sizes = sorted(p.bytes for p in trk.take_live())
    assert sizes == sorted([5 * 8 * 4, 5 * 16 * 4])
    assert trk.live_bytes == sum(sizes)
    out.backward()
    del out
    assert trk.take_live() == [] and trk.live_bytes == 0
    freed = trk.take_freed()
    assert sorted(p.bytes for p in freed) == sizes
    assert all(p.t_free > p.t_store for p in freed)


def test_explicit_hold_extends_a_pebble_until_released():
    trk = pebbles.PebbleTracker(iter(range(1, 10**6)).__next__, [])
    t = torch.zeros(3, 3)
    tok = trk.hold(t, "recv", layer=4, step=2, mb=1)
    tok2 = trk._ref(t, "saved")  # autograd saves the same tensor: no new bytes
    assert trk.live_bytes == 36 and len(trk.take_live()) == 1
    trk._unref(tok2)
    assert trk.live_bytes == 36, "still held by the executor"
    trk.release(tok)
    (p,) = trk.take_freed()
    assert (p.kind, p.layer, p.step, p.mb, p.bytes) == ("recv", 4, 2, 1, 36)


def test_memory_source_that_fails_is_recorded_not_fatal(monkeypatch):
    def broken():
        raise OSError("no /proc here")
    monkeypatch.setattr(memory, "_rss_source", broken)
    readers, status = memory.open_sources(torch.device("cpu"))
    assert "rss" not in readers
    assert status["rss"].startswith("unavailable: OSError: no /proc here")
    assert status["nvml"].startswith("unavailable")


def test_sampler_drops_a_source_that_fails_mid_run_and_keeps_sampling():
    rows, calls, lock = [], {"n": 0}, threading.Lock()

    def flaky():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("driver went away")
        return 1

    def write(r):
        with lock:
            rows.extend(r)
    s = memory.MemorySampler({"flaky": flaky, "ok": lambda: 2}, iter(range(10**6)).__next__,
                             write, interval_s=0.001)
    s.start()
    while True:
        with lock:
            if sum(1 for r in rows if r[1] == "ok") >= 10:
                break
        threading.Event().wait(0.01)
    s.stop()
    assert sum(1 for r in rows if r[1] == "flaky") == 3
    assert not s.is_alive()


def test_trace_file_is_a_versioned_arrow_stream_any_reader_reads(tmp_path):
    """A trace file is a plain Arrow IPC stream: pyarrow's own reader (not ours) reads its
    header (schema metadata) and rows, a batch per write, and empty cells as nulls."""
    import pyarrow.ipc as ipc
    f = writer.TraceFile(tmp_path / "events.r3.arrows", "events", 3, writer.EVENT_COLS)
    f.write_rows([(0, 0, 5, "fwd", 10, 20, None, -1, -1, 0, ""),
                  (0, 0, -1, "send", 21, 30, 21, 4, 0, 64, "A0.0.3>4")])
    f.write_rows([(1, 0, 5, "fwd", 40, 50, None, -1, -1, 0, "")])
    f.close()
    r = ipc.open_stream(tmp_path / "events.r3.arrows")
    assert r.schema.metadata[b"harness-trace"] == b"format=2 kind=events rank=3"
    batches = list(r)
    assert [b.num_rows for b in batches] == [2, 1]
    df = pd.concat(b.to_pandas() for b in batches)
    assert list(df.columns) == list(writer.EVENT_COLS)
    assert df["pair"].isna().tolist() == [True, False, True] and df["pair"].iloc[1] == "A0.0.3>4"
    assert df["bytes"].tolist() == [0, 64, 0]
    assert df["kind"].astype(str).tolist() == ["fwd", "send", "fwd"]
    assert df["tb"].isna().tolist() == [True, False, True]


def test_a_column_like_the_last_batches_is_written_again_right(tmp_path):
    """The writer reuses a column's Arrow array when its values equal the last batch's (steps
    repeat all but their times): each batch still reads back as written, a new text value
    extends the dictionary."""
    import pyarrow.ipc as ipc
    f = writer.TraceFile(tmp_path / "p.arrows", "pebbles", 0, writer.PEBBLE_COLS)
    a = [(0, 0, 1, "saved", 64, 10, 20, "0.linear", "4x4", "float32"),
         (0, 1, 1, "saved", 64, 11, None, "0.linear", "4x4", "float32")]
    b = [(1,) + r[1:5] + (r[5] + 100, None if r[6] is None else r[6] + 100) + r[7:] for r in a]
    c = [b[0][:7] + ("1.linear",) + b[0][8:], b[1]]
    for rows in (a, b, b, c):
        f.write_rows(rows)
    f.close()
    got = [bt.to_pylist() for bt in ipc.open_stream(tmp_path / "p.arrows")]
    cols = writer.PEBBLE_COLS
    want = [[dict(zip(cols, r)) for r in rows] for rows in (a, b, b, c)]
    assert got == want


def test_writer_and_reader_agree_on_the_run_format(tmp_path):
    """The harness's Tracer writes, analysis.read.load reads: same files, columns and values. A column
    added to one side only, a renamed file or a changed header fails here."""
    from analysis.read.load import read_trace
    from harness import runformat as F
    from harness.trace.pebbles import PebbleTracker

    clk = C.Clock()
    tracker = PebbleTracker(clk.now, [])
    tr = writer.Tracer(tmp_path, 2, C.HostTimer(clk), tracker)
    tr.span(0, 1, 3, "fwd", 100, 200)
    tr.comm(0, 1, "send", 210, 300, 220, 3, F.tag("act", 1), 64, F.pair_id("act", 0, 1, 2, 3))
    tok = tracker.hold(torch.zeros(4), "recv", 3, 0, 1)
    tracker.release(tok)
    tr.memory.write_rows([(400, "rss", 1 << 20)])
    tr.close()
    warnings = []
    for kind, cols in F.TRACE_COLS.items():
        path = tmp_path / F.trace_file(kind, 2)
        import pyarrow.ipc as ipc
        head = ipc.open_stream(path).schema.metadata[F.HEADER_KEY.encode()].decode()
        assert "# harness-trace " + head == F.trace_header(kind, 2)
        df = read_trace(path, kind, warnings)
        assert list(df.columns) == list(cols), kind
        assert len(df) == {"events": 2, "pebbles": 1, "memory": 1}[kind]
    assert warnings == []
    ev = read_trace(tmp_path / F.trace_file("events", 2), "events", [])
    send = ev[ev["kind"] == "send"].iloc[0]
    assert (send["tag"], send["pair"], send["tb"]) == (2, "A0.1.2>3", 220)
    peb = read_trace(tmp_path / F.trace_file("pebbles", 2), "pebbles", [])
    assert (peb["kind"].iloc[0], peb["bytes"].iloc[0]) == ("recv", 16)
