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
