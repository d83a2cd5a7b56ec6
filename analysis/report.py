"""The terminal table: metrics.json's summary as fixed-width text (pure: dict in, str out)."""
from __future__ import annotations

from analysis.measure.waits import warning_line
from harness.schedule import BUBBLE_FORMULA

MIB = 2**20


def _ms(x):
    return "-" if x is None else f"{x * 1e3:.2f}"


def _pct(x, scale=100):
    return "-" if x is None else f"{x * scale:.1f}"


def _mib(x):
    return "-" if x is None else f"{x / MIB:.2f}"


def _share(cq: dict) -> str:
    """Clock uncertainty as % of the median transfer; '!' when the split is unreliable."""
    sh = cq.get("share")
    txt = "inf" if sh is None or sh == float("inf") else f"{sh * 100:.0f}"
    return txt + ("!" if not cq.get("reliable", True) else "")


def table(summary: dict, title: str = "") -> str:
    """Per-rank medians, then the pipeline's bubble, memory and clock lines."""
    sch, pipe, clock = summary["schedule"], summary["pipeline"], summary["clock"]
    lines = [f"{title}  schedule={sch['name']} stages={sch['stages']} "
             f"microbatches={sch['microbatches']}".strip(),
             f"steps: {summary['steps']['note']}", ""]
    head = ["rank", "compute", "snd wait", "snd xfer", "rcv wait", "rcv xfer", "idle",
            "warm-up", "steady", "cool-dn", "util", "overlap", "caused", "clock",
            "peak act", "(theory)", "peak mem"]
    units = ["", "ms", "ms", "ms", "ms", "ms", "ms", "ms", "ms", "ms", "%", "%", "ms",
             "%xfer", "MiB", "MiB", "MiB"]
    q = clock.get("split_per_rank") or {}
    rows = []
    for r in summary["per_rank"]:
        dev = r.get("peak_device_bytes") or {}
        src = "rss" if "rss" in dev else next(iter(dev), None)
        cq = q.get(str(r["rank"]))
        rows.append([str(r["rank"]), _ms(r["compute"]), _ms(r.get("send_wait")),
                     _ms(r.get("send_transfer")), _ms(r["recv_wait"]),
                     _ms(r["recv_transfer"]), _ms(r["idle"]), _ms(r.get("idle_warmup")),
                     _ms(r.get("idle_steady")), _ms(r.get("idle_cooldown")),
                     _pct(r["utilisation"]), _pct(r["overlap_pct"], 1), _ms(r.get("caused_idle")),
                     "-" if not cq else _share(cq),
                     _mib(r["peak_act_bytes"]), _mib(r["peak_act_theory"]),
                     (_mib(dev[src]) + f" {src}") if src else "-"])
    w = [max(len(x[i]) for x in [head, units] + rows) for i in range(len(head))]
    fmt = lambda xs: "  ".join(x.rjust(n) for x, n in zip(xs, w)).rstrip()  # noqa: E731
    lines += [fmt(head), fmt(units)] + [fmt(r) for r in rows] + [""]
    th, v = pipe["bubble_theory"], sch.get("virtual") or 1
    lines.append(f"step span {_ms(pipe['step_span_s'])} ms; bubble measured "
                 f"{_pct(pipe['bubble_measured'])} % vs theory "
                 + ("-" if th is None else f"{th * 100:.1f} %")
                 + (f" ({sch['name']}{f', v={v}' if v > 1 else ''}: "
                    f"{BUBBLE_FORMULA[sch['name']]})" if sch["name"] in BUBBLE_FORMULA else ""))
    if pipe.get("bubble_theory_measured_times") is not None:
        t = (pipe.get("simulated") or {}).get("times_s") or {}
        lines.append(f"  theory with the measured F/B/W per chunk-microbatch ("
                     f"{_ms(t.get('fwd'))} / {_ms(t.get('bwd_in'))} / {_ms(t.get('bwd_w'))} ms): "
                     f"{_pct(pipe['bubble_theory_measured_times'])} %")
    if "bubble_simulated" in pipe:
        err = (pipe.get("simulated") or {}).get("error")
        lines.append(f"  simulated (harness.simulate on this run's own action times): bubble "
                     f"{_pct(pipe['bubble_simulated'])} %, step "
                     f"{_ms(pipe.get('step_span_simulated_s'))} ms" + (f" ({err})" if err else ""))
    lines.append(f"clock alignment: ±{clock['uncertainty_s'] * 1e6:.1f} µs (max rtt/2), "
                 f"±{clock.get('uncertainty_max_s', 0.0) * 1e6:.1f} µs with start/end "
                 f"disagreement; {clock['violations']} clock-condition violations in "
                 f"{clock['matched_pairs']} send/recv pairs"
                 + (f"; {clock['unmatched_receives']} receives without their send"
                    if clock["unmatched_receives"] else ""))
    warn = warning_line(clock)
    if warn:
        lines.append("WARNING: " + warn + " ('!' in the clock column)")
    worst = (summary.get("blame") or {}).get("worst_offender")
    if worst:
        lines.append(f"worst offender: rank {worst['rank']} caused {_ms(worst['caused_s'])} ms "
                     f"of the other ranks' waiting per step ({_pct(worst['share'])} % of all "
                     f"blamed waiting), mostly in {worst['mostly']}")
    cp = summary.get("critical_path") or {}
    if cp.get("per_rank_kind"):
        parts = ", ".join(f"r{x['rank']} {x['kind']} {_pct(x['share'])} %"
                          for x in sorted(cp["per_rank_kind"], key=lambda x: -x["share"]))
        lines.append(f"critical path ({_ms(cp['span_s'])} ms): {parts}")
    return "\n".join(lines)
