"""The vectorised metrics against straightforward slow computations of the same definitions, on
synthetic runs with clock noise (overlapping spans, clock-condition violations) and on
unsorted inputs: step_table's unions and phase idle, blame's wait walk, the interval helpers."""
import numpy as np
import pytest

from analysis import metrics as M
from analysis.measure import blame as B, critical as C, intervals as iv
from analysis.read.load import load_run
from harness.runformat import COMPUTE
from harness.synthetic import pipeline_frames, write_run

MS = 1_000_000


def noisy_run(path, schedule="1f1b", p=3, m=4, seed=0, noise=True, **kw):
    """A synthetic run whose event times carry ±0.2 ms of noise (noise=False: none): spans of
    one rank overlap, some receives end before their send started."""
    fr = pipeline_frames(p=p, m=m, schedule=schedule, steps=3, **kw)
    ev = fr["events"]
    rng = np.random.default_rng(seed)
    if noise:
        for c in ("t0", "t1"):
            ev[c] = ev[c] + rng.integers(-MS // 5, MS // 5, len(ev))
        ev["tb"] = ev["tb"].astype("Int64") + rng.integers(-MS // 5, MS // 5, len(ev))
    write_run(path, fr["meta"], ev, fr["pebbles"], fr["memory"], fr["stats"], fr["schedule"])
    return load_run(path)


def union_length(spans):
    """|union| of (start, end) pairs, by merging them one at a time."""
    total, cur = 0.0, None
    for s, e in sorted((s, e) for s, e in spans if e > s):
        if cur is None or s > cur[1]:
            total += 0 if cur is None else cur[1] - cur[0]
            cur = [s, e]
        else:
            cur[1] = max(cur[1], e)
    return total + (0 if cur is None else cur[1] - cur[0])


@pytest.mark.parametrize("schedule,p,m,v", [("1f1b", 3, 4, 1), ("gpipe", 2, 4, 1),
                                            ("interleaved", 2, 4, 2), ("zb_h1", 3, 4, 1)])
def test_step_table_matches_a_per_row_computation(tmp_path, schedule, p, m, v):
    run = noisy_run(tmp_path / "r", schedule, p, m, virtual=v)
    ev = run.events[run.events["lane"] != "step"]
    t = M.step_table(run.events)
    win = M.step_windows(ev)
    for row in t.itertuples():
        d = ev[(ev["step"] == row.step) & (ev["rank"] == row.rank)]
        comp = d[d["kind"].isin(COMPUTE)]
        spans = list(zip(comp["start"], comp["end"]))
        comm = d[d["lane"].isin(("send", "recv"))]
        cspans = list(zip(comm["start"], comm["end"]))
        blocked = d[d["lane"] == "send"]
        assert row.compute == pytest.approx(union_length(spans), rel=1e-12, abs=1e-15)
        assert row.send == pytest.approx(union_length(zip(
            blocked["tb"].fillna(blocked["start"]), blocked["end"])), rel=1e-12, abs=1e-15)
        both = union_length(spans) + union_length(cspans) - union_length(spans + cspans)
        if union_length(cspans) > 0:
            assert row.overlap_pct == pytest.approx(
                max(both, 0) / union_length(cspans) * 100, rel=1e-9, abs=1e-9)
        # phases: the compute spans clipped to each phase, then their union
        w0, w1 = win.loc[row.step, "start"], win.loc[row.step, "end"]
        if comp.empty:
            assert (row.idle_warmup, row.idle_steady, row.idle_cooldown) == (0, row.idle, 0)
            continue
        bwd = comp[comp["kind"] == "bwd"]
        fwd = comp[comp["kind"].isin(("fwd", "loss"))]
        a = bwd["start"].min() if len(bwd) else w1
        b = fwd["end"].max() if len(fwd) else w0
        for lo, hi, got in ((w0, min(a, b), row.idle_warmup), (min(a, b), max(a, b),
                            row.idle_steady), (max(a, b), w1, row.idle_cooldown)):
            busy = union_length([(min(max(s, lo), hi), min(max(e, lo), hi)) for s, e in spans])
            assert got == pytest.approx(max(0.0, hi - lo) - busy, rel=1e-12, abs=1e-15)


def slow_blame(rt, cause, lo, hi):
    """Per interval, {(rank, kind): seconds} by _explain's walk alone, one interval at a time."""
    out = []
    for r, a, b in zip(cause.tolist(), lo.tolist(), hi.tolist()):
        acc = {}

        def emit(rank, kind, t, v, acc=acc):
            acc[(rank, kind)] = acc.get((rank, kind), 0.0) + v
        B._explain(rt, r, a, b, 1, emit)
        out.append(acc)
    return out


@pytest.mark.parametrize("schedule,p,m,seed", [("1f1b", 4, 8, 0), ("gpipe", 3, 4, 1),
                                               ("zb_h1", 3, 4, 2), ("naive", 3, 1, 3)])
def test_vectorised_blame_walk_equals_the_walk(tmp_path, schedule, p, m, seed):
    run = noisy_run(tmp_path / "r", schedule, p, m, seed)
    rt = C.RankTimes(run.events)
    _, a, b, cause = B._waits(rt)
    # every wait, and every wait cut at arbitrary times (starts inside pieces, overlaps)
    rng = np.random.default_rng(seed)
    mid = a + (b - a) * rng.random(len(a))
    lo, hi, cause = np.r_[a, a, mid], np.r_[b, mid, b], np.r_[cause, cause, cause]
    ok = hi > lo
    lo, hi, cause = lo[ok], hi[ok], cause[ok]
    q, rank, kind, start, sec, names = B._explain_all(rt, cause, lo, hi)
    want = slow_blame(rt, cause, lo, hi)
    got = [{} for _ in want]
    for i in np.lexsort((start, q)):          # time order within each interval, as the walk
        key = (int(rank[i]), names[kind[i]])
        got[q[i]][key] = got[q[i]].get(key, 0.0) + sec[i]
    assert got == want                         # the same pieces, added in the same order
    assert sum(len(g) for g in got) > len(got)  # waits were passed on, not only computed


def test_blame_frame_unchanged_on_noisy_and_clean_runs(tmp_path):
    """blame() as the walk one wait-window at a time computed it (the pre-vectorised code)."""
    for i, kw in enumerate([dict(schedule="gpipe", p=4, m=8),
                            dict(schedule="1f1b", p=3, m=4, noise=False)]):
        run = noisy_run(tmp_path / str(i), **kw)
        rt = C.RankTimes(run.events)
        win = M.step_windows(run.events[run.events["lane"] != "step"]).sort_index()
        rows = []
        for victim, a, b, cause in zip(*(x.tolist() for x in B._waits(rt))):
            for step, w0, w1 in zip(win.index, win["start"], win["end"]):
                if max(a, w0) < min(b, w1):
                    acc = slow_blame(rt, np.array([cause]), np.array([max(a, w0)]),
                                     np.array([min(b, w1)]))[0]
                    rows += [(step, victim, r, k, v) for (r, k), v in acc.items()
                             if r != victim and v > 0]
        got = B.blame(run.events, rt)
        want = {}
        for step, victim, r, k, v in rows:
            want[(step, victim, r, k)] = want.get((step, victim, r, k), 0.0) + v
        have = {(s, vi, r, k): v for s, vi, r, k, v in got.itertuples(index=False)}
        assert have.keys() == want.keys()
        assert list(have.values()) == pytest.approx([want[k] for k in have], rel=1e-12)


def test_factorize_and_union_order():
    rng = np.random.default_rng(0)
    for x in (rng.integers(0, 50, 1000), rng.integers(-5, 5, 100), rng.integers(0, 10**12, 50),
              np.array([], np.int64), np.array([3])):
        u, inv = iv.factorize(x)
        wu, winv = np.unique(x, return_inverse=True)
        assert u.tolist() == wu.tolist() and inv.tolist() == winv.tolist()
        assert u.dtype == x.dtype
    g = rng.integers(0, 5, 300)
    s = rng.random(300)
    e = s + rng.random(300) * 0.1
    o = np.lexsort((s, g))
    for a, b in zip(iv.union(g, s, e), iv.union(g[o], s[o], e[o])):   # unsorted == sorted
        assert a.tolist() == b.tolist()


def _union_per_group(g, s, e):
    """union() the slow way: each group's sorted intervals merged one at a time."""
    out = []
    for k in np.unique(g):
        cur = None
        for a, b in sorted(zip(s[g == k].tolist(), e[g == k].tolist())):
            if b <= a:
                continue
            if cur is None or a > cur[1]:
                if cur is not None:
                    out.append((k, *cur))
                cur = [a, b]
            else:
                cur[1] = max(cur[1], b)
        if cur is not None:
            out.append((k, *cur))
    return out


@pytest.mark.parametrize("layout,n_groups", [("disjoint", 200), ("ranks", 200),
                                             ("reaching", 200), ("overlapping", 40),
                                             ("overlapping", 200)])
def test_union_equals_a_per_group_merge(layout, n_groups):
    """union()'s one running maximum over all groups, restarted where the value carried in
    passes a group's first end, merges exactly as each group merged on its own: groups that
    follow in time (a rank's steps), groups that start over (each rank's steps after the last
    rank's), groups whose predecessor reaches into their first interval (no restart needed),
    groups that overlap (a restart at most groups; pandas' per-group maximum past 64)."""
    rng = np.random.default_rng(n_groups + len(layout))
    per = 12
    k = np.repeat(np.arange(n_groups), per)
    s = rng.random(len(k)) * 2
    e = s + rng.random(len(k)) * 0.6
    if layout == "disjoint":
        s, e = s + k * 10.0, e + k * 10.0
    elif layout == "ranks":       # 4 "ranks" of n/4 steps each, each rank's clock from 0
        off = (k % (n_groups // 4)) * 10.0
        s, e = s + off, e + off
    elif layout == "reaching":    # first interval [10k, 10k+5]; the last of the group before
        s, e = s + 10.0 * k + 0.1, e + 10.0 * k + 0.1   # ends at 10k+0.5, inside it
        first = np.arange(0, len(k), per)
        s[first], e[first] = 10.0 * k[first], 10.0 * k[first] + 5
        e[first[1:] - 1] = 10.0 * k[first[1:]] + 0.5
    else:                         # each group starts 0.5 after the one before
        s, e = s + k * 0.5, e + k * 0.5
    o = np.lexsort((s, k))
    g, s, e = k[o], s[o], e[o]
    got = list(zip(*(x.tolist() for x in iv.union(g, s, e))))
    assert got == _union_per_group(g, s, e)
