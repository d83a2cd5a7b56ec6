"""The critical path's fast parts against straightforward references: the lockstep walk (many
steps per numpy pass) against the one-at-a-time walk, and RankTimes' span table against a
Python loop over the events, on synthetic runs whose clocks are made bad on purpose (broken
clock condition, overlapping spans, missing partners)."""
import math

import numpy as np
import pandas as pd
import pytest

from analysis import load_run
from analysis.measure import critical as C
from harness.synthetic import make_run

CASES = [("1f1b", 4, 1), ("gpipe", 2, 1), ("interleaved", 2, 2), ("zbv", 3, 2), ("zb_h1", 3, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("crit")
    return {name: load_run(make_run(d / name, p=p, m=2 * p, schedule=name, steps=4, virtual=v,
                                    overlap=p == 3, clocks={1: (2_000_000, 2_040_000)}))
            for name, p, v in CASES}


def noisy(events, seed, scale):
    """Per-rank clock offsets and per-event jitter of `scale` seconds, some empty spans, some
    events and pair ids dropped."""
    rng = np.random.default_rng(seed)
    ev = events.copy()
    n = len(ev)
    off = rng.normal(0, scale, ev["rank"].max() + 1)[ev["rank"]] + rng.normal(0, scale / 3, n)
    for c in ("start", "end", "tb"):
        ev[c] = ev[c] + off
    ev["end"] = np.where(rng.random(n) < 0.02, ev["start"] - 1e-4, ev["end"])
    ev = ev[rng.random(n) > 0.03]
    return ev.assign(pair=ev["pair"].mask(rng.random(len(ev)) < 0.03))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
@pytest.mark.parametrize("scale", [0.0, 1e-4, 2e-3, 1e-2])
@pytest.mark.parametrize("seed", [3, 5])
def test_lockstep_walk_is_the_one_at_a_time_walk(runs, name, scale, seed, monkeypatch):
    ev = noisy(runs[name].events, seed, scale)
    monkeypatch.setattr(C, "VECTOR_MIN", 10 ** 9)     # every step walked alone (Python lists)
    one = C.critical_path(ev)
    assert len(one) and set(one["kind"]) <= set(C.KINDS)
    for vmin in (1, 3):   # all in lockstep; lockstep, then the last 2 walks alone (numpy arrays)
        monkeypatch.setattr(C, "VECTOR_MIN", vmin)
        pd.testing.assert_frame_equal(C.critical_path(ev), one, check_exact=True)
    # plain text columns and a non-range index take the same path
    plain = ev.assign(kind=ev["kind"].astype(object), pair=ev["pair"].astype(object))
    pd.testing.assert_frame_equal(C.critical_path(plain), one, check_exact=True)


def test_rank_times_is_a_loop_over_the_events(runs):
    ev = noisy(runs["zbv"].events, 3, 5e-4)
    rt = C.RankTimes(ev)
    first = {}   # (kind, pair) -> the first such event
    for row in ev.itertuples():
        if isinstance(row.pair, str):
            first.setdefault((row.kind, row.pair), row)
    want = {}
    for row in ev.itertuples():
        if row.kind not in C.COMPUTE + ("send", "recv"):
            continue
        comm = row.kind in ("send", "recv")
        s = row.tb if comm and not math.isnan(row.tb) else row.start
        if not row.end > s:
            continue
        other = first.get(({"send": "recv", "recv": "send"}.get(row.kind), row.pair))
        pr, pt, pe = -1, math.nan, math.nan
        if comm and other is not None:
            pr, pt = other.rank, other.start
            pe = other.end if row.kind == "send" else math.nan
        want.setdefault(row.rank, []).append((s, row.end, row.kind, pr, pt, pe, row.Index))
    assert sorted(rt.r) == sorted(want)
    for r, rows in want.items():
        rows.sort(key=lambda x: x[0])   # stable: ties keep the events' order
        d = rt.r[r]
        got = list(zip(d["s"].tolist(), d["e"].tolist(), d["what"].tolist(), d["prank"].tolist(),
                       d["ptime"].tolist(), d["pend"].tolist(), d["event"].tolist()))
        assert [tuple("nan" if x != x else x for x in g) for g in got] == \
            [tuple("nan" if x != x else x for x in w) for w in rows]
        assert d["reach"].tolist() == np.maximum.accumulate([w[1] for w in rows]).tolist()
        assert rt.lists[r]["s"] == d["s"].tolist()


@pytest.mark.parametrize("vmin", [1, 10 ** 9])
def test_a_send_that_starts_as_the_receive_blocks_is_not_late(vmin, monkeypatch):
    # r0 F 0-4, send 4-4.1; r1 blocks in the receive from 4 (tb = the send's start): the
    # sender was not late, so the path stays on r1 (idle before 4), in both walks
    monkeypatch.setattr(C, "VECTOR_MIN", vmin)
    ev = pd.DataFrame({"rank": [0, 0, 1, 1], "step": 0, "kind": ["fwd", "send", "recv", "fwd"],
                       "lane": ["compute", "send", "recv", "compute"],
                       "start": [0.0, 4.0, 1.0, 4.1], "end": [4.0, 4.1, 4.1, 9.0],
                       "tb": [np.nan, 4.0, 4.0, np.nan], "pair": [None, "a", "a", None]})
    path = C.critical_path(ev)
    assert [(r, k) for r, k in path[["rank", "kind"]].itertuples(index=False)] == \
        [(1, "other"), (1, "transfer"), (1, "compute")]
