"""analysis.compare's action-by-action table on a hand-made trace with known times."""
import numpy as np
import pandas as pd
import pytest

from analysis import compare


def _events(fwd_ms: float, wait_ms: float) -> pd.DataFrame:
    """Two steps, two ranks; rank 1 runs two forwards of two blocks each (fwd_ms per block),
    then an opt; each forward waits for a message from rank 0 (posted wait_ms after rank 1
    began to block, then 1 ms on the wire)."""
    rows = []
    for step in (0, 1):
        t = 100.0 * step
        for mb in (0, 1):
            send = t + wait_ms
            rows.append((0, step, mb, -1, "send", send, send, send, 1, f"A{step}.{mb}.0>1"))
            rows.append((1, step, mb, -1, "recv", t, send + 1, t, 0, f"A{step}.{mb}.0>1"))
            t = send + 1
            for layer in (2, 3):
                rows.append((1, step, mb, layer, "fwd", t, t + fwd_ms, np.nan, -1, None))
                t += fwd_ms
        rows.append((1, step, -1, -1, "opt", t, t + 3, np.nan, -1, None))
    df = pd.DataFrame(rows, columns=["rank", "step", "mb", "layer", "kind", "start", "end", "tb",
                                     "peer", "pair"])
    for c in ("start", "end", "tb"):
        df[c] = df[c] / 1e3
    df["bytes"] = 8
    df["lane"] = df["kind"].map({"send": "send", "recv": "recv"}).fillna("compute")
    return df


def test_time_per_step_and_per_action_of_each_kind():
    t = compare.action_times(_events(2.0, 5.0), [1]).set_index(["rank", "action"])
    assert t.loc[(1, "fwd"), "per_step"] == pytest.approx(8e-3)     # 2 mb x 2 blocks x 2 ms
    assert t.loc[(1, "fwd"), "count"] == 2
    assert t.loc[(1, "opt"), "per_step"] == pytest.approx(3e-3)
    assert t.loc[(1, "recv wait"), "per_step"] == pytest.approx(10e-3)
    assert t.loc[(1, "recv transfer"), "per_step"] == pytest.approx(2e-3)
    assert t.loc[(1, "recv wait"), "count"] == 2


def test_the_table_says_where_two_runs_differ():
    a = compare.action_times(_events(2.0, 5.0), [1])
    b = compare.action_times(_events(3.0, 1.0), [1])
    tab = compare.action_table(a, b).set_index(["rank", "action"])
    assert tab.loc[(1, "fwd"), "diff_ms"] == pytest.approx(4.0)
    assert tab.loc[(1, "fwd"), "b_each_ms"] == pytest.approx(6.0)    # per microbatch
    assert tab.loc[(1, "recv wait"), "diff_ms"] == pytest.approx(-8.0)
    assert tab.loc[(1, "opt"), "diff_ms"] == pytest.approx(0.0)
    assert list(tab.loc[1].index) == ["fwd", "opt", "recv wait", "recv transfer"]
    text = compare.action_text(tab.reset_index())
    assert "recv wait" in text and "   -4.00" not in text and "    4.00" in text


def test_runtime_names_pytorchs_class():
    assert compare.runtime_of({}) == "ours"
    assert compare.runtime_of({"runtime": {"name": "torch", "class": "Schedule1F1B"}}) == \
        "PyTorch's Schedule1F1B"
