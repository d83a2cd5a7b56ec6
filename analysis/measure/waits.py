"""Send-side wait states and how far the clocks let us trust any wait/transfer split.

Scalasca's two point-to-point wait states (FIELD.md, "Waiting, blame and prediction"):
- late sender: a receive blocked before its matching send began (metrics.recv_split);
- late receiver: a rendezvous send blocked until its matching receive was posted (here).
Both are waiting, not wire. Which one a schedule shows depends only on the order of its waits:
1F1B's stage 0 sends its activation before it waits for the gradient, so its idle time sits in
the send (the receiver posts late), GPipe's sits in the receive. Splitting both the same way
lets schedules be compared on what they really wait for.

    send wait     = max(0, min(r.start, s.end) - s.tb)     r.start: when the receive was posted
    send transfer = s.end - max(s.tb, r.start), clipped at 0

(s.tb = entry into Send, or into Wait for an Isend; all times on the aligned clock.) A send that
returned before its receive was posted did not wait for the receiver: MPI buffered it (an eager
message), so its wait is 0 and its whole blocked time, a copy of microseconds, is transfer.

Clock quality. Both splits compare a time taken on one rank with a time taken on another, so
they are as good as the alignment. Per rank r (rank 0: 0), the alignment uncertainty is

    u_r = max(rtt_start, rtt_end) / 2  +  disagreement_r

rtt/2 bounds the error of one ping-pong estimate (Cristian, Score-P); interpolating between two
estimates keeps the larger bound. disagreement_r = |(o_end - o_start) - expected drift|: ranks on
rank 0's host read one CLOCK_MONOTONIC, so their true offset is constant (or, with the
debug.clock_* knob, drifts by exactly the injected ppm) and any other change between the start
and end estimates is estimation error; across hosts real drift cannot be told from error and
disagreement is 0. A send/receive between ranks a and b is uncertain by u_a + u_b. When that
exceeds SHARE_LIMIT of the median wire time of the rank's messages (the transfer of receives
that waited for their sender, so saw the whole transfer), the split of waits into wait and transfer is not
reliable, and the per-rank table, metrics.json and the figures say so.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.measure.spill import Spill

SHARE_LIMIT = 0.10  # uncertainty / median transfer above which a split is flagged unreliable


def pair_join(events: pd.DataFrame, kind: str, other: str) -> pd.DataFrame:
    """Each `kind` event (send or recv) joined on `pair` to its counterpart of kind `other`,
    whose rank, start and end come as {other}_rank, {other}_start, {other}_end (NaN when the
    counterpart's trace is missing). A left join that keeps the `kind` events' order (what
    DataFrame.merge gives, by index lookup: on categorical pair ids one array take)."""
    cols = [c for c in ("rank", "step", "mb", "pair", "start", "end", "tb", "peer", "bytes")
            if c in events]
    k = events["kind"]
    mine = events.loc[(k == kind).to_numpy(), cols].reset_index(drop=True)
    pair = events["pair"]
    theirs = events.loc[((k == other) & pair.notna()).to_numpy(), ["pair", "rank", "start", "end"]]
    theirs = theirs.drop_duplicates("pair")
    idx = _lookup(theirs["pair"], mine["pair"])
    hit = idx >= 0
    for c in ("rank", "start", "end"):
        v = theirs[c].to_numpy()
        if hit.all():
            mine[f"{other}_{c}"] = v[idx]
        else:   # as a left merge: a missing counterpart makes the column float with NaN
            col = np.full(len(idx), np.nan)
            col[hit] = v[idx[hit]]
            mine[f"{other}_{c}"] = col
    return mine


def _lookup(keys: pd.Series, wanted: pd.Series) -> np.ndarray:
    """Position in `keys` (unique, no NA) of each of `wanted`, -1 where absent or NA."""
    kd, wd = keys.dtype, wanted.dtype
    if (isinstance(kd, pd.CategoricalDtype) and isinstance(wd, pd.CategoricalDtype)
            and kd.categories.equals(wd.categories)):
        pos = np.full(len(kd.categories) + 1, -1, dtype=np.int64)   # last slot: NA (code -1)
        pos[keys.cat.codes.to_numpy()] = np.arange(len(keys))
        pos[-1] = -1
        return pos[wanted.cat.codes.to_numpy()]
    out = pd.Index(keys.astype(object)).get_indexer(wanted.astype(object))
    return np.where(wanted.isna().to_numpy(), -1, out)


def recv_split(events: pd.DataFrame) -> pd.DataFrame:
    """Each receive joined to its send on `pair`: wait (late sender) and transfer, in seconds.

    Columns: rank, step, mb, pair, start, end, tb, peer, bytes, send_rank, send_start,
    send_end, wait, transfer, matched, violation. Unmatched receives (the sender's trace is missing) get
    NaN wait/transfer.
    """
    m = pair_join(events, "recv", "send")
    tb = m["tb"].fillna(m["start"]).to_numpy()
    s0, r1 = m["send_start"].to_numpy(), m["end"].to_numpy()
    m["wait"] = np.maximum(0.0, np.minimum(s0, r1) - tb)
    m["transfer"] = np.maximum(0.0, r1 - np.maximum(tb, s0))
    m["matched"] = m["send_start"].notna()
    m["violation"] = m["matched"] & (r1 < s0)
    return m


def send_split(events: pd.DataFrame) -> pd.DataFrame:
    """Each send joined to its receive on `pair`: late-receiver wait and transfer, seconds.

    Columns: rank, step, mb, pair, start, end, tb, peer, bytes, recv_rank, recv_start,
    recv_end, wait, transfer, matched. Unmatched sends (the receiver's trace is missing) get NaN."""
    m = pair_join(events, "send", "recv")
    tb = m["tb"].fillna(m["start"]).to_numpy()
    r0, s1 = m["recv_start"].to_numpy(), m["end"].to_numpy()
    eager = s1 <= r0          # returned before the receive existed: buffered, never waited
    m["wait"] = np.where(eager, 0.0, np.maximum(0.0, np.minimum(r0, s1) - tb))
    m["transfer"] = np.where(eager, np.maximum(0.0, s1 - tb),
                             np.maximum(0.0, s1 - np.maximum(tb, r0)))
    m["matched"] = m["recv_start"].notna()
    return m


def clock_check(meta: dict, rs: pd.DataFrame) -> dict:
    """Alignment uncertainty (max rtt/2 over the estimates, s) and clock-condition violations."""
    est = (meta.get("clock") or {}).get("estimates") or []
    rtt = [e.get("rtt_ns", 0) for e in est]
    return {"uncertainty_s": max(rtt) / 2e9 if rtt else 0.0,
            "violations": int(rs["violation"].sum()), "matched_pairs": int(rs["matched"].sum()),
            "unmatched_receives": int((~rs["matched"]).sum())}


def rank_uncertainty(meta: dict) -> dict:
    """{rank: u_r in seconds} for every rank with clock estimates (module docstring)."""
    est = (meta.get("clock") or {}).get("estimates") or []
    ranks = meta.get("ranks") or []
    host = {int(i.get("rank", k)): i.get("host") for k, i in enumerate(ranks)}
    out = {}
    for r in sorted({int(e.get("rank", 0)) for e in est}):
        best = {}
        for e in est:
            if int(e.get("rank", 0)) != r:
                continue
            ph = e.get("phase", "start")
            if ph not in best or e.get("rtt_ns", 0) < best[ph].get("rtt_ns", 0):
                best[ph] = e
        half = max(e.get("rtt_ns", 0) for e in best.values()) / 2
        dis = 0.0
        a, b = best.get("start"), best.get("end")
        same_host = host.get(r) is not None and host.get(r) == host.get(0)
        if a and b and same_host:
            knob = next((i.get("clock_knob") for i in ranks if i.get("rank") == r), None) or {}
            drift = -float(knob.get("drift_ppm") or 0.0) * 1e-6 * (b["t_local"] - a["t_local"])
            dis = abs((b["offset_ns"] - a["offset_ns"]) - drift)
        out[r] = (half + dis) / 1e9
    return out


def clock_quality(meta: dict, rs: pd.DataFrame) -> dict:
    """How much the clocks blur the wait/transfer split, per rank and overall.

    rs: recv_split. Per rank r: pair uncertainty = max over the matched messages r sent
    or received of u_r + u_peer; share = that / median wire time of those messages (receive
    transfer of the receives that waited for their sender, which saw the whole transfer; of all
    matched receives if none waited). `reliable` is False where share > SHARE_LIMIT."""
    spill = Spill()
    return quality(meta, spill, spill_clock(spill, rs))


def spill_clock(spill, rs: pd.DataFrame, key: str = "clk") -> dict:
    """Keep, for quality(), the transfer of every matched receive for both ranks it joins,
    among all matched receives and among those that waited for their sender; -> {selection:
    {rank: its peers}}, to be merged over chunks with merge_peers."""
    m = rs[rs["matched"].astype(bool)]
    out = {}
    for sel, mm in (("all", m), ("waited", m[m["wait"] > 0])):
        msgs = pd.concat([
            pd.DataFrame({"rank": mm["rank"], "peer": mm["send_rank"],
                          "transfer": mm["transfer"]}),
            pd.DataFrame({"rank": mm["send_rank"], "peer": mm["rank"],
                          "transfer": mm["transfer"]})],
            ignore_index=True).astype({"rank": int, "peer": int})
        peers = {}
        for r, d in msgs.groupby("rank"):
            peers[int(r)] = set(int(q) for q in d["peer"].unique())
            moved = d["transfer"].to_numpy()
            spill.add(f"{key}.{sel}.{int(r)}", moved[moved > 0])
        out[sel] = peers
    return out


def merge_peers(a: dict, b: dict) -> dict:
    """spill_clock's results of two chunks, as one."""
    out = {}
    for sel in set(a) | set(b):
        x, y = a.get(sel, {}), b.get(sel, {})
        out[sel] = {r: x.get(r, set()) | y.get(r, set()) for r in set(x) | set(y)}
    return out


def quality(meta: dict, spill, peers: dict, key: str = "clk") -> dict:
    """clock_quality from what spill_clock kept (and merge_peers merged)."""
    u = rank_uncertainty(meta)
    # wire time: a receive that waited for its sender saw the whole transfer (send start to
    # receive end); one whose data arrived before it blocked saw only the tail of it
    sel = "waited" if peers.get("waited") else "all"
    per_rank = {}
    for r in sorted(peers.get(sel, {})):
        pu = max(u.get(int(r), 0.0) + u.get(int(q), 0.0) for q in peers[sel][r])
        med = spill.median(f"{key}.{sel}.{r}")
        share = pu / med if med > 0 else (float("inf") if pu > 0 else 0.0)
        per_rank[int(r)] = {"uncertainty_s": pu, "median_transfer_s": med,
                            "share": share, "reliable": bool(share <= SHARE_LIMIT)}
    bad = [r for r, v in per_rank.items() if not v["reliable"]]
    worst = max((v["share"] for v in per_rank.values()), default=0.0)
    return {"rank_uncertainty_s": {str(k): v for k, v in u.items()},
            "uncertainty_max_s": max(u.values(), default=0.0),
            "split_per_rank": {str(k): v for k, v in per_rank.items()},
            "split_reliable": not bad, "unreliable_ranks": bad,
            "worst_share": worst if np.isfinite(worst) else None,
            "share_limit": SHARE_LIMIT,
            "definition": "u_r = max(rtt_start, rtt_end)/2 + |offset change between the start "
                          "and end estimates not explained by injected drift| (same host as "
                          "rank 0; 0 across hosts); a message between a and b is uncertain by "
                          "u_a + u_b; unreliable when that exceeds "
                          f"{SHARE_LIMIT:.0%} of the rank's median transfer"}


def warning_line(q: dict) -> str | None:
    """One line for tables and figures when the split is unreliable, else None."""
    if q.get("split_reliable", True):
        return None
    share = q.get("worst_share")
    pct = "∞" if share is None else f"{share * 100:.0f}"
    ranks = ",".join(map(str, q["unreliable_ranks"]))
    return (f"clock uncertainty ±{q['uncertainty_max_s'] * 1e6:.0f} µs is up to {pct} % of the "
            f"median transfer (ranks {ranks}): wait/transfer split unreliable")
