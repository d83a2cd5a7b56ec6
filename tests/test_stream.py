"""A run analysed a chunk of steps at a time gives what one pass over the whole run gives.

Steps are independent beyond their neighbours (analysis/read/scan.py, analysis/stream.py): every
summary number, steps.csv and every figure of a run cut into chunks must equal the run's in one
piece, on runs whose chunk boundaries fall inside a step's window (ranks a step apart, a
receive of step k posted while its sender is still in step k-1), with skewed clocks and with
pebbles that outlive their step. Plus the pieces that make it bounded: exact medians from
spilled values, curves cut to pixel columns from pieces, the trace's window of steps."""
import json

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import load_run, metrics  # noqa: E402
from analysis.measure.decimate import Curve  # noqa: E402
from analysis.measure.spill import Spill  # noqa: E402
from analysis.measure.windows import steady, step_windows  # noqa: E402
from analysis.pebble import main  # noqa: E402
from analysis.plots.common import band, envelope  # noqa: E402
from analysis.read import scan  # noqa: E402
from harness.synthetic import MS, make_run, pipeline_frames, write_run  # noqa: E402

# runs whose steps overlap in time: each rank starts its next step when it is done with its
# last, so the first rank is in step k+1 while the last finishes step k (its optimizer step
# is slow) and a receive of step k+1 is posted in step k's time
RUNS = {
    "1f1b-overlapped": dict(p=3, m=4, schedule="1f1b", overlap=True, steps=6, continuous=True,
                            t_opt=[MS // 2, 2 * MS, 15 * MS]),
    "zbv-skewed": dict(p=2, m=4, schedule="zbv", virtual=2, steps=5, continuous=True,
                       t_opt=[MS, 10 * MS], clocks={1: (3_000_000, 3_050_000)}),
    "gpipe": dict(p=3, m=4, schedule="gpipe", steps=5),
}


def _summary_by_chunks(d, target):
    idx = scan.open_run(d)
    spill, parts = Spill(), []
    for a, b in idx.plan(target):
        c = idx.chunk(a, b)
        parts.append(metrics.partial(c.events, c.pebbles, c.memory, idx.meta, spill, c.own,
                                     steady(idx.complete)[1], t_range=(c.t_lo, c.t_hi)))
    return metrics.finish(parts, idx.meta, idx.complete, spill), len(parts)


def _close(a, b, path=""):
    """a == b, floats to 1e-9 relative (the sums of means are added in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == b or (a != a and b != b) or abs(a - b) <= 1e-9 * max(abs(a), abs(b)), \
            (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("stream") / request.param, **RUNS[request.param])


@pytest.fixture(scope="module")
def whole(run):
    """The run's summary in one piece (one per run, for both chunk sizes), as JSON gives it."""
    r = load_run(run)
    return json.loads(json.dumps(metrics.summarize(r.events, r.pebbles, r.memory, r.meta,
                                                   r.steps)))


def test_steps_overlap_in_time_where_they_should(tmp_path):
    """The runs above are the case they claim: windows that overlap, a receive posted before
    its step's window opens, and chunks of one step whose context had to widen."""
    d = make_run(tmp_path / "r", **RUNS["1f1b-overlapped"])
    ev = load_run(d).events
    w = step_windows(ev[ev["lane"] != "step"])
    assert (w["start"].to_numpy()[1:] < w["end"].to_numpy()[:-1]).all()
    recv = ev[ev["kind"] == "recv"].groupby("step")["start"].min()
    assert (recv.to_numpy()[1:] < w["start"].to_numpy()[1:]).all()
    idx = scan.open_run(d)
    lo, hi = idx.context(2, 2)          # positions in idx.steps (= the steps here)
    assert lo <= 1 and hi >= 3


@pytest.mark.parametrize("target", [1, 400])
def test_chunks_merge_into_the_whole(run, whole, target):
    """Two halves merged = whole, and one step per chunk: every number of metrics.json."""
    got, n = _summary_by_chunks(run, target)
    assert n > 1
    _close(whole, json.loads(json.dumps(got)))


def test_pebbles_held_across_steps_are_handed_to_every_chunk(tmp_path):
    """Pebbles never freed (pipeline.detach=false keeps the received input's graph) are
    written at the end of the file: kept aside by the index and counted in every later
    chunk's activation bytes, so peaks per step and the memory curve are the whole run's."""
    fr = pipeline_frames(p=2, m=2, schedule="gpipe", steps=5)
    peb = fr["pebbles"]
    never = (peb["kind"] == "recv").to_numpy()
    peb.loc[never, "t_free"] = np.nan
    fr["pebbles"] = peb.sort_values(["rank", "t_free"], kind="stable", na_position="last")
    d = write_run(tmp_path / "held", fr["meta"], fr["events"], fr["pebbles"], fr["memory"],
                  fr["stats"], fr["schedule"])
    idx = scan.open_run(d)
    assert sum(t.num_rows for t in idx.kept.values() if t is not None) == int(never.sum())
    r = load_run(d)
    whole = metrics.summarize(r.events, r.pebbles, r.memory, r.meta, r.steps)
    got, _ = _summary_by_chunks(d, 1)
    _close(json.loads(json.dumps(whole)), json.loads(json.dumps(got)))
    peaks = [x["peak_act_bytes"] for x in whole["per_step"] if x["rank"] == 1]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]     # the held bytes grow


@pytest.mark.parametrize("name, figures", [("1f1b-overlapped", False), ("zbv-skewed", True)])
def test_the_cli_in_chunks_writes_what_it_writes_in_one(name, figures, tmp_path, monkeypatch):
    """analysis.pebble with one step per chunk (forked workers, the files indexed in forked
    processes too) and in one chunk, serially: metrics.json and steps.csv byte for byte, the
    trace's events but for the flows' ids, and the figures pixel for pixel. On the two runs
    whose chunks are hard: steps that overlap (both), clocks that disagree (zbv-skewed, whose
    figures are compared; drawing them takes most of the time); the summary of every run is
    compared chunked and whole above."""
    from PIL import Image
    run = make_run(tmp_path / name, **RUNS[name])
    outs = {}
    monkeypatch.setattr(scan, "PARALLEL_BYTES", 0)    # --serial indexes in-process anyway
    for mode, extra in (("one", ["--serial", "--chunk-rows", "100000000"]),
                        ("chunks", ["--chunk-rows", "1"])):
        outs[mode] = tmp_path / mode
        assert main([str(run), "--out", str(outs[mode]), "--format",
                     "png" if figures else "none", "-q", *extra]) == 0
    one, chunks = outs["one"], outs["chunks"]
    a, b = (json.loads((x / "metrics.json").read_text()) for x in (one, chunks))
    a["run"].pop("path"), b["run"].pop("path")
    _close(a, b)
    assert (one / "steps.csv").read_bytes() == (chunks / "steps.csv").read_bytes()
    for f in ("pebble.png", "timeline.png", "memory.png") if figures else ():
        assert np.array_equal(np.asarray(Image.open(one / f)), np.asarray(Image.open(chunks / f)))

    def events(x):
        evs = json.loads((x / "trace.json").read_text())["traceEvents"]
        return sorted(json.dumps({k: v for k, v in e.items() if k != "id"}, sort_keys=True)
                      for e in evs)
    assert events(one) == events(chunks)


def test_a_long_run_traces_a_window_of_steps_and_every_step_in_outline(tmp_path):
    """Past --trace-max-events, trace.json holds the first two steady steps, the slowest and
    the last in full, and per step of the run its time, bubble and each rank's peak: read back
    by json (a reader that is not the writer), the slices are those steps' events."""
    # step 7 made the slowest (its actions start 1.6x later), so the window must find it
    d = make_run(tmp_path / "long", p=3, m=4, schedule="1f1b", steps=12, slow={7: 1.6})
    ev = load_run(d).events
    assert main([str(d), "--format", "none", "-q", "--trace-max-events", "10"]) == 0
    tr = json.loads((d / "analysis" / "trace.json").read_text())
    m = json.loads((d / "analysis" / "metrics.json").read_text())
    per_step = pd.read_csv(d / "analysis" / "steps.csv")
    spans = dict(zip(per_step.loc[per_step["rank"] == 0, "step"],
                     per_step.loc[per_step["rank"] == 0, "span"]))
    stead = m["steps"]["steady"]
    slowest = max(stead, key=lambda s: spans[s])
    assert slowest == 7
    want = sorted(set(stead[:2]) | {m["steps"]["complete"][-1], slowest})
    slices = [e for e in tr["traceEvents"] if e.get("ph") == "X" and e.get("cat") != "critical"]
    assert sorted({e["args"]["step"] for e in slices}) == want
    n = ev[ev["step"].isin(want)]
    assert len(slices) == len(n)
    steps = [e for e in tr["traceEvents"] if e.get("name") == "step time"]
    assert len(steps) == len(spans) and {round(e["args"]["ms"], 3) for e in steps} == \
        {round(v * 1e3, 3) for v in spans.values()}
    peaks = [e for e in tr["traceEvents"] if e.get("name") == "peak activations per step"]
    assert len(peaks) == len(per_step)
    assert tr["otherData"]["steps_in_full"]
    # --trace-steps and --trace all
    assert main([str(d), "--out", str(tmp_path / "ab"), "--format", "none", "-q",
                 "--trace-steps", "3:4"]) == 0
    tr = json.loads((tmp_path / "ab" / "trace.json").read_text())
    assert {e["args"]["step"] for e in tr["traceEvents"] if e.get("ph") == "X"
            and e.get("cat") != "critical"} == {3, 4}
    assert main([str(d), "--out", str(tmp_path / "bad"), "-q", "--trace-steps", "x"]) == 2


def test_spilled_medians_are_np_median(tmp_path):
    """Medians by selection over values kept on disk (passes over 16 bits at a time) equal
    np.median of the values in memory, with virtual zeros added, for any split of the values
    over writers and files."""
    import analysis.measure.spill as S
    rng = np.random.default_rng(1)
    old = S.SMALL, S.BLOCK
    S.SMALL, S.BLOCK = 500, 333          # force several passes and blocks
    try:
        for trial in range(40):
            n = int(rng.integers(1, 6000))
            v = (rng.normal(size=n), rng.integers(0, 4, size=n).astype(float),
                 rng.exponential(size=n) * 1e-6)[trial % 3]
            zeros = int(rng.integers(0, 2000)) if trial % 2 else 0
            disk = Spill(tmp_path / str(trial), tag="a")
            other = Spill(tmp_path / str(trial), tag="b")
            for k, part in enumerate(np.array_split(v, 4)):
                (disk if k % 2 else other).add("x", part)
            assert disk.median("x", zeros) == np.median(np.r_[v, np.zeros(zeros)])
            mem = Spill()
            mem.add("x", v)
            assert mem.median("x", zeros) == np.median(np.r_[v, np.zeros(zeros)])
    finally:
        S.SMALL, S.BLOCK = old
    assert np.isnan(Spill().median("none"))


@pytest.mark.parametrize("step", [False, True])
def test_curves_cut_in_pieces_equal_band_and_envelope_of_the_whole(step):
    """A curve added in pieces (analysis.measure.decimate.Curve, merged) gives array for array what
    plots.common.band and envelope give on the whole curve."""
    rng = np.random.default_rng(2)
    for trial in range(25):
        n_cols = int(rng.integers(3, 60))
        m = int(rng.integers(5 * n_cols, 40 * n_cols))
        t = np.sort(rng.uniform(0, 10, m))
        if trial % 3 == 0:
            t[5:9] = t[5]                  # repeated times
        y = np.round(rng.normal(size=m) * 4) * 2**20 if trial % 2 else rng.normal(size=m)
        lo, hi = t[0] - rng.uniform(0, 1), t[-1] + rng.uniform(0, 1)
        cuts = np.sort(rng.choice(np.arange(1, m), size=int(rng.integers(1, 6)), replace=False))
        cuts = cuts[np.r_[True, t[cuts[1:]] != t[cuts[:-1]]]]
        cuts = cuts[t[cuts] != t[cuts - 1]]      # pieces split between distinct times
        pieces = []
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, m]):
            c = Curve(lo, hi, n_cols, step)
            c.add(t[a:b], y[a:b])
            pieces.append(c)
        whole = pieces[0]
        for c in pieces[1:]:
            whole = whole.merge(c)
        x1, y1 = band(t, y, lo, hi, n_cols, step)
        x2, y2 = whole.band()
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2), trial
        e1, e2 = envelope(t, y, lo, hi, n_cols), whole.envelope()
        assert np.array_equal(e1[0], e2[0]) and np.array_equal(e1[1], e2[1]), trial


def test_each_format_version_reads_from_a_committed_fixture():
    """A run of each format version, as the harness of its day wrote it (tests/fixtures:
    `mpirun -n 2 python -m harness.run` of a 4-layer MLP, GPipe m=2, 3 steps; format 1 by
    the harness before format 2), loads and analyses, with what that run holds."""
    from pathlib import Path
    here = Path(__file__).parent / "fixtures"
    for v in (1, 2):
        r = load_run(here / f"format{v}")
        assert r.meta["format"] == v and r.warnings == [] and r.steps == [0, 1, 2]
        comp = r.events[r.events["kind"].isin(["fwd", "bwd"]) & (r.events["layer"] < 4)]
        # 4 layers x 2 microbatches x 3 steps, forward and backward, over the 2 ranks (the
        # loss's backward, layer 4, besides)
        assert len(comp) == 4 * 2 * 3 * 2
        assert set(r.events["kind"]) >= {"fwd", "bwd", "send", "recv", "opt", "step"}
        assert len(r.pebbles) and set(r.memory["source"]) == {"rss"}
        s = metrics.summarize(r.events, r.pebbles, r.memory, r.meta, r.steps)
        assert s["clock"]["violations"] == 0 and s["clock"]["matched_pairs"] == 2 * 2 * 3


def test_a_chunk_reads_only_its_batches(tmp_path, monkeypatch):
    """A chunk of steps reads the batches of its steps and its context, not the file from
    its start: bounded reading (format 2)."""
    d = make_run(tmp_path / "r", p=2, m=2, schedule="1f1b", steps=20)
    idx = scan.open_run(d)
    read = []
    real = scan.FileIndex.batches

    def spy(self, want, cache):
        read.append((self.kind, self.rank, want.tolist()))
        return real(self, want, cache)
    monkeypatch.setattr(scan.FileIndex, "batches", spy)
    idx.chunk(10, 11)
    ev = [w for k, r, w in read if k == "events" and r == 0]
    assert ev and min(ev[0]) >= 8 and max(ev[0]) <= 13


def test_step_rows_come_back_typed_as_one_table(tmp_path):
    """steps.csv's rows kept chunk by chunk (on disk) come back as one table of them would
    type them: a chunk whose peak activation bytes are all known (integers) is written as
    floats when another chunk has a step without them (NaN), as pandas' concat would."""
    import io

    from analysis.stream import StepRows
    a = pd.DataFrame({"step": [0, 0], "rank": [0, 1], "peak_act_bytes": [4096, 8192],
                      "span": [0.5, 0.5]})
    b = pd.DataFrame({"step": [1, 1], "rank": [0, 1], "peak_act_bytes": [4096.0, np.nan],
                      "span": [0.25, 0.25]})
    for i, (folder, parts) in enumerate((f, p) for f in (tmp_path, None)
                                        for p in ([a, b], [a, a.assign(step=[1, 1])])):
        if folder is not None:
            folder = folder / str(i)
            folder.mkdir()
        rows = StepRows(folder)
        for p in parts:
            rows.add(p)
        got = io.StringIO()
        for k, t in enumerate(rows.frames()):
            t.to_csv(got, index=False, header=k == 0)
        assert got.getvalue() == pd.concat(parts, ignore_index=True).to_csv(index=False)
        assert rows.ranks == {0, 1} and rows.n == 4
