"""The terminal table: metrics.json's summary as fixed-width text (pure: dict in, str out)."""
from __future__ import annotations

from harness.schedule import BUBBLE_FORMULA

MIB = 2**20


def _ms(x):
    return "-" if x is None else f"{x * 1e3:.2f}"


def _pct(x, scale=100):
    return "-" if x is None else f"{x * scale:.1f}"


def _mib(x):
    return "-" if x is None else f"{x / MIB:.2f}"


def table(summary: dict, title: str = "") -> str:
    """Per-rank medians, then the pipeline's bubble, memory and clock lines."""
    sch, pipe, clock = summary["schedule"], summary["pipeline"], summary["clock"]
    lines = [f"{title}  schedule={sch['name']} stages={sch['stages']} "
             f"microbatches={sch['microbatches']}".strip(),
             f"steps: {summary['steps']['note']}", ""]
    head = ["rank", "compute", "send", "recv wait", "recv xfer", "idle", "util", "overlap",
            "peak act", "(theory)", "peak mem"]
    units = ["", "ms", "ms", "ms", "ms", "ms", "%", "%", "MiB", "MiB", "MiB"]
    rows = []
    for r in summary["per_rank"]:
        dev = r.get("peak_device_bytes") or {}
        src = "rss" if "rss" in dev else next(iter(dev), None)
        rows.append([str(r["rank"]), _ms(r["compute"]), _ms(r["send"]), _ms(r["recv_wait"]),
                     _ms(r["recv_transfer"]), _ms(r["idle"]), _pct(r["utilisation"]),
                     _pct(r["overlap_pct"], 1), _mib(r["peak_act_bytes"]),
                     _mib(r["peak_act_theory"]),
                     (_mib(dev[src]) + f" {src}") if src else "-"])
    w = [max(len(x[i]) for x in [head, units] + rows) for i in range(len(head))]
    fmt = lambda xs: "  ".join(x.rjust(n) for x, n in zip(xs, w)).rstrip()  # noqa: E731
    lines += [fmt(head), fmt(units)] + [fmt(r) for r in rows] + [""]
    th = pipe["bubble_theory"]
    lines.append(f"step span {_ms(pipe['step_span_s'])} ms; bubble measured "
                 f"{_pct(pipe['bubble_measured'])} % vs theory "
                 + ("-" if th is None else f"{th * 100:.1f} %")
                 + (f" ({sch['name']}: {BUBBLE_FORMULA[sch['name']]})"
                    if sch["name"] in BUBBLE_FORMULA else ""))
    lines.append(f"clock alignment: ±{clock['uncertainty_s'] * 1e6:.1f} µs (max rtt/2); "
                 f"{clock['violations']} clock-condition violations in "
                 f"{clock['matched_pairs']} send/recv pairs"
                 + (f"; {clock['unmatched_receives']} receives without their send"
                    if clock["unmatched_receives"] else ""))
    return "\n".join(lines)
