"""trace.json: valid Chrome trace JSON, flows paired, busy time equal to the metrics'."""
import json

import numpy as np
import pytest

from analysis import load_run
from analysis.chrome import TID, chrome_json
from analysis.metrics import live_bytes, step_table
from harness.synthetic import make_run


@pytest.fixture(scope="module", params=["gpipe", "1f1b"])
def run(request, tmp_path_factory):
    return load_run(make_run(tmp_path_factory.mktemp("c") / "r", p=3, m=3,
                             schedule=request.param, steps=3, clocks={2: (70_000, 90_000)}))


@pytest.fixture(scope="module")
def trace(run):
    return json.loads(chrome_json(run.events, run.pebbles, run.memory, run.meta))["traceEvents"]


def test_metadata_names_processes_and_lanes(run, trace):
    procs = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    assert procs == {r: f"rank {r}" for r in range(run.world_size)}
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace if e["name"] == "thread_name"}
    assert lanes[0, TID["compute"]] == "compute" and lanes[1, TID["recv"]] == "recv"


def test_flows_pair_up_and_bind_to_their_slices(trace):
    s = {e["id"]: e for e in trace if e["ph"] == "s"}
    f = [e for e in trace if e["ph"] == "f"]
    assert len(s) == len(f) == len({e["id"] for e in f}) and set(s) == {e["id"] for e in f}
    assert all(e["bp"] == "e" for e in f)
    slices = [e for e in trace if e["ph"] == "X"]

    def inside(ev, tid):
        return any(x["pid"] == ev["pid"] and x["tid"] == tid and
                   x["ts"] <= ev["ts"] <= x["ts"] + x["dur"] for x in slices)
    assert all(inside(e, TID["send"]) for e in s.values())
    assert all(inside(e, TID["recv"]) for e in f)


def test_compute_lane_busy_time_equals_metrics(run, trace):
    busy = {}
    for e in trace:
        if e["ph"] == "X" and e["tid"] == TID["compute"]:
            busy[e["pid"]] = busy.get(e["pid"], 0.0) + e["dur"]
    comp = step_table(run.events).groupby("rank")["compute"].sum() * 1e6
    for r, us in comp.items():
        assert busy[r] == pytest.approx(us, abs=1e-2)


def test_counters_and_units(run, trace):
    c = [e for e in trace if e["ph"] == "C"]
    names = {e["name"] for e in c}
    assert names == {"activations (pebbles)", "memory rss"}
    act = [e for e in c if e["name"].startswith("activations")]
    lb = live_bytes(run.pebbles)
    assert len(act) == len(lb)
    assert max(e["args"]["bytes"] for e in act) == lb["bytes"].max() > 0
    x = [e for e in trace if e["ph"] == "X"]
    end = max(e["ts"] + e["dur"] for e in x)
    assert np.isclose(end, run.events["end"].max() * 1e6, atol=1e-2)   # µs


def _reference(events, pebbles, memory, meta, critical):
    """trace.json built the plain way, one dict per trace event (json.dumps' input), from the
    format analysis/chrome.py documents: what its text templates must equal."""
    from analysis.metrics import recv_split

    def us(x):
        return float(np.round(float(x) * 1e6, 3))

    def name(k, layer, mb, peer, step):
        if k == "step":
            return f"step {step}"
        s = k + (f" L{layer}" if layer >= 0 else "") + (f" mb{mb}" if mb >= 0 else "")
        return s + {"send": f" ->{peer}", "recv": f" <-{peer}"}.get(k, "")
    out = []
    ranks = sorted(set(events["rank"]) | set(pebbles["rank"]) | set(memory["rank"]))
    for r in ranks:
        out += [{"ph": "M", "name": "process_name", "pid": r, "tid": 0,
                 "args": {"name": f"rank {r}"}},
                {"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0,
                 "args": {"sort_index": r}}]
    seen = []
    for r, lane in zip(events["rank"], events["lane"]):
        if (r, lane) not in seen:
            seen.append((r, lane))
            t = TID.get(lane, 5)
            out += [{"ph": "M", "name": "thread_name", "pid": r, "tid": t, "args": {"name": lane}},
                    {"ph": "M", "name": "thread_sort_index", "pid": r, "tid": t,
                     "args": {"sort_index": t}}]
    if critical is not None and len(critical):
        out += [{"ph": "M", "name": "thread_name", "pid": r, "tid": 6,
                 "args": {"name": "critical path"}} for r in sorted(critical["rank"].unique())]
        out += [{"name": f"critical: {c.what}", "cat": "critical", "ph": "X", "ts": us(c.start),
                 "dur": us(c.end - c.start), "pid": c.rank, "tid": 6,
                 "args": {"step": c.step, "kind": c.kind}} for c in critical.itertuples()]
    rs = recv_split(events)
    first = {}
    for row in rs.itertuples():
        if row.pair == row.pair and row.pair is not None and row.pair not in first:
            first[row.pair] = row
    for e in events.itertuples():
        args = {"step": e.step, "mb": e.mb, "layer": e.layer, "bytes": e.bytes}
        if isinstance(e.pair, str):
            args["pair"] = e.pair
            x = first.get(e.pair)
            if e.kind == "recv" and x is not None and x.wait == x.wait:
                args["wait_us"], args["transfer_us"] = us(x.wait), us(x.transfer)
        out.append({"name": name(e.kind, e.layer, e.mb, e.peer, e.step), "cat": e.kind,
                    "ph": "X", "ts": us(e.start), "dur": us(e.end - e.start), "pid": e.rank,
                    "tid": TID.get(e.lane, 5), "args": args})
    m = rs[rs["matched"]]
    out += [{"name": "p2p", "cat": "flow", "ph": "s", "id": i, "ts": us(x.send_start),
             "pid": int(x.send_rank), "tid": TID["send"]} for i, x in enumerate(m.itertuples(), 1)]
    out += [{"name": "p2p", "cat": "flow", "ph": "f", "bp": "e", "id": i, "ts": us(x.start),
             "pid": int(x.rank), "tid": TID["recv"]} for i, x in enumerate(m.itertuples(), 1)]
    out += [{"name": "activations (pebbles)", "ph": "C", "ts": us(x.time), "pid": int(x.rank),
             "tid": 0, "args": {"bytes": int(x.bytes)}} for x in live_bytes(pebbles).itertuples()]
    out += [{"name": f"memory {x.source}", "ph": "C", "ts": us(x.time), "pid": int(x.rank),
             "tid": 0, "args": {"bytes": int(x.bytes)}} for x in memory.itertuples()]
    return out


@pytest.mark.parametrize("how", ["gpipe-skew", "1f1b-overlap", "a rank's events missing"])
def test_trace_text_equals_dict_per_event_construction(tmp_path, how):
    """The writer renders text from templates for speed; its events must be exactly those a
    dict per event would give (json.loads equality: names, times rounded to the ns, args)."""
    from analysis.measure.critical import critical_path
    kw = {"gpipe-skew": dict(p=3, m=3, schedule="gpipe", clocks={2: (70_000, 90_000)}),
          "1f1b-overlap": dict(p=4, m=6, schedule="1f1b", overlap=True),
          "a rank's events missing": dict(p=3, m=2, schedule="1f1b")}[how]
    d = make_run(tmp_path / "r", steps=3, **kw)
    if how == "a rank's events missing":   # its partners' sends and receives go unmatched
        (d / "trace" / "events.r2.arrows").unlink()
    run = load_run(d)
    path = critical_path(run.events)
    got = json.loads(chrome_json(run.events, run.pebbles, run.memory, run.meta, path))
    want = _reference(run.events, run.pebbles, run.memory, run.meta, path)
    assert len(got["traceEvents"]) == len(want)
    for i, (g, w) in enumerate(zip(got["traceEvents"], want)):
        assert g == w, (i, g, w)
    assert any("wait_us" in e.get("args", {}) for e in want)
    if how == "a rank's events missing":
        assert any("pair" in e.get("args", {}) and "wait_us" not in e["args"]
                   and e["cat"] == "recv" for e in want)


@pytest.mark.parametrize("strings", ["plain", "escaped"])
def test_row_layouts_render_numbers_and_strings_as_json_would(monkeypatch, strings):
    """The byte-level renderer (fixed columns, right-aligned numbers, XOR-ed digits, rows that
    end early compacted away) against json.loads of a dict per row: times rounded to the ns as
    np.round(x * 1e6, 3) does, negative, zero and huge values, strings that need escaping."""
    from analysis import chrome
    monkeypatch.setattr(chrome, "CHUNK", 700)           # several chunks, one partial
    rng = np.random.default_rng(1)
    n = 2500
    secs = np.concatenate([[0.0, -0.0, 1e-10, -1e-10, 5e-10, -5e-10, 1.0000005, -0.4e-6,
                            123456.7895, 9.99e5, -3e4],
                           rng.uniform(-2, 2, n - 511) * 10.0 ** rng.integers(-9, 6, n - 511),
                           (rng.integers(-10**12, 10**12, 500) + 0.5) / 1e9])   # ns ties
    ints = np.concatenate([[0, -1, 9, 10, 999, 1000, -1000, 10**15, -10**15, 12, 345],
                           rng.integers(-10**6, 10**9, n - 11)])
    words = (["A0.0.1>2", "x", "fwd L3 mb0", "step 12"] if strings == "plain" else
             ["A0.0.1>2", 'say "hi"', "back\\slash", "tab\there", "µs", "", "\x01"])
    codes = rng.integers(0, len(words), n)
    g = rng.integers(0, 4, n)
    g[:4] = [2, 1, 0, 3]
    # group 0 ends after the time, group 1 after the integer, group 2 has all three fields,
    # group 3 the time and the string (a blank where the integer goes)
    pieces = [['{"t":', '{"tt":', '{"ttt":', '{"tttt":'], ['}', ',"i":', ',"i":', ',"s":'],
              ["", "}", ',"s":', ""], ["", "", "}", "}"]]
    parts = [bytes(b) for b, _ in chrome._section(
        g, pieces, [chrome._Us(secs), chrome._Int(ints), chrome._Str(codes, words)],
        has=[[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]])]
    text = b"".join(parts).decode("ascii")
    got = json.loads("[" + text[1:] + "]")
    want = []
    for k, t, i, c in zip(g, secs, ints, codes):
        row = {("t", "tt", "ttt", "tttt")[k]: float(np.round(t * 1e6, 3))}
        if k in (1, 2):
            row["i"] = int(i)
        if k in (2, 3):
            row["s"] = words[c]
        want.append(row)
    assert got == want
    # and the text itself: right-aligned numbers as %.3f / %d would write them
    first = text.split(",\n")[1:4]
    assert first[0].split('"ttt":')[1].split(",")[0].strip() == "%.3f" % np.round(secs[0] * 1e6, 3)


def test_written_the_same_to_binary_text_and_string_files(tmp_path, run):
    """write_chrome takes binary files, text files (written through their byte buffer when
    the encoding keeps ASCII as it is) and io.StringIO: the same trace in each."""
    from analysis.chrome import write_chrome
    args = (run.events, run.pebbles, run.memory, run.meta)
    want = chrome_json(*args)
    with open(tmp_path / "b.json", "wb") as f:
        nb = write_chrome(f, *args)
    for enc in ("utf-8", "latin-1", "utf-16"):
        with open(tmp_path / "t.json", "w", encoding=enc) as f:
            f.write("")
            nt = write_chrome(f, *args)
        assert (tmp_path / "t.json").read_text(encoding=enc) == want
    assert (tmp_path / "b.json").read_text() == want and nb == nt
    assert json.loads(want)["traceEvents"]


def test_events_appended_to_a_written_trace_follow_its_own(tmp_path, run):
    """analysis.read.kineto merges by append_events, which finds the tail after the last event:
    the padded rows leave it where it was."""
    from analysis.chrome import append_events, write_chrome
    path = tmp_path / "trace.json"
    with open(path, "w", encoding="utf-8") as f:
        write_chrome(f, run.events, run.pebbles, run.memory, run.meta)
    before = json.loads(path.read_text())
    extra = [{"name": "aten::mm", "cat": "kineto.cpu_op", "ph": "X", "ts": 1.5, "dur": 2.0,
              "pid": 0, "tid": 100}]
    assert append_events(path, [json.dumps(e) for e in extra]) == 1
    after = json.loads(path.read_text())
    assert after["traceEvents"] == before["traceEvents"] + extra
    assert {k: v for k, v in after.items() if k != "traceEvents"} == {
        k: v for k, v in before.items() if k != "traceEvents"}
