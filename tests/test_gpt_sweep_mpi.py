"""Everything downstream works for the GPT: a real sweep of GPT runs (schedules x recompute), its
index, the sweep statistics and the paper's bubble and memory figures."""
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis import figures as figs, style, sweep_stats  # noqa: E402
from analysis.plots import bubble_plot, peak_memory_plot  # noqa: E402
from experiments import sweep  # noqa: E402
from helpers import Batches, declare_runs, render  # noqa: E402

SPEC = {"sweep": {
    "name": "gpt_t", "base": "gpt", "repeats": 1, "ranks": [2],
    "grid": {"schedule": ["gpipe", "1f1b"], "pipeline.recompute": ["none", "full"]},
    "fixed": {"pipeline.microbatches": 2, "gpt.layers": 2, "gpt.d": 32, "gpt.heads": 2,
              "gpt.seq": 16, "gpt.vocab": 64, "train.steps": 3, "threads": 1},
    "points": [{"ranks": 2, "schedule": "naive", "pipeline.microbatches": 1}],
}}
POINTS = [p for p in map(sweep.check, sweep.expand(SPEC)) if not p.skip]
# the grid's four runs, made with the session's other runs (one start-up for all)
GRID = {f"{p.id}-r0": (p.ranks, [*p.args(), "quiet=true"]) for p in POINTS if p.tag == "grid"}
declare_runs(__name__, GRID)


def test_a_gpt_sweep_runs_and_draws(tmp_path):
    # the grid's four runs made beforehand; the sweep finds them complete, as when it resumes,
    # and launches the one point left with its real launcher (mpirun)
    assert len(GRID) == 4 and len(POINTS) == 5
    made = Batches(__name__)
    for name in GRID:
        shutil.copytree(made[name], tmp_path / "sw" / "runs" / name)
    idx = sweep.run_sweep(SPEC, tmp_path / "sw", log=lambda *a, **k: None)
    assert (idx["status"] == "complete").all(), idx[["status", "message"]]
    assert len(idx) == 5
    launched = idx[idx["seconds"].notna()]
    assert launched["point"].tolist() == [p.id for p in POINTS if p.tag != "grid"]
    sw = figs.load_sweep(tmp_path / "sw")
    runs = sw["runs"]
    assert set(runs["schedule"]) == {"naive", "gpipe", "1f1b"}
    bub = sweep_stats.bubble_table(runs)
    mem = sweep_stats.memory_table(sw["ranks"])
    # recompute none and full of one schedule: two different per-microbatch theories
    theory = {}
    for m in sw["meta"].values():
        theory.setdefault(m["schedule"]["name"], set()).add(
            sum(m["pebbles_theory"]["bytes_per_microbatch"]))
    assert len(theory["gpipe"]) == len(theory["1f1b"]) == 2
    rk = sw["ranks"]                       # every run's measured peak is its own theory
    assert len(rk) == 10 and (rk["peak_act"] == rk["peak_theory"]).all()
    with plt.rc_context(style.RC):
        render(bubble_plot(bub, sw["cores"])[0])
        render(peak_memory_plot(mem, sw["cores"])[0])
