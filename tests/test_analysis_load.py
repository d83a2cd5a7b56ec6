"""The loader on complete, partial (crashed / running) and corrupt run directories, and the CLI."""
import json
import os
import shutil

import numpy as np
import pytest

from analysis import RunFormatError, load_run
from analysis.pebble import main
from harness.synthetic import make_run

EVENT_COLS = ["rank", "step", "mb", "layer", "kind", "lane", "start", "end", "tb", "peer",
              "tag", "bytes", "pair"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "base", p=2, m=2, schedule="gpipe",
                    steps=3)


@pytest.fixture
def run_dir(base, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(base, d)
    return d


@pytest.fixture(scope="module")
def base_csv(tmp_path_factory):
    """The same run as a harness before format 2 wrote it: CSV trace files."""
    return make_run(tmp_path_factory.mktemp("runs") / "base", p=2, m=2, schedule="gpipe",
                    steps=3, fmt=1)


@pytest.fixture
def csv_dir(base_csv, tmp_path):
    d = tmp_path / "csv"
    shutil.copytree(base_csv, d)
    return d


def test_both_formats_load_to_the_same_frames(base, base_csv):
    a, b = load_run(base), load_run(base_csv)
    import pandas as pd
    for name in ("events", "pebbles", "memory", "stats"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)
    assert (a.steps, a.origin_ns, a.warnings) == (b.steps, b.origin_ns, b.warnings)


def test_complete_run_frames(run_dir):
    run = load_run(run_dir)
    assert run.warnings == [] and run.steps == [0, 1, 2]
    assert list(run.events.columns) == EVENT_COLS
    assert list(run.pebbles.columns) == ["rank", "step", "mb", "layer", "kind", "bytes",
                                         "stored", "freed", "module", "shape", "dtype"]
    assert list(run.memory.columns) == ["rank", "time", "source", "bytes"]
    assert run.events["start"].min() == 0.0                      # seconds since run start
    comm = run.events["kind"].isin(["send", "recv"])
    assert run.events.loc[comm, "tb"].notna().all() and run.events.loc[~comm, "tb"].isna().all()
    assert run.events.loc[comm, "pair"].notna().all() and run.events.loc[~comm, "pair"].isna().all()
    assert len(run.stats) == 6 and run.schedule["name"] == "gpipe"


def test_missing_rank_file(run_dir):
    (run_dir / "trace" / "events.r1.arrows").unlink()
    run = load_run(run_dir)
    assert set(run.events["rank"]) == {0}
    assert any("events.r1.arrows missing" in w for w in run.warnings)
    assert any("rank 1" in w and "no complete step" in w for w in run.warnings)


def test_truncated_last_line_is_dropped(csv_dir):
    p = csv_dir / "trace" / "events.r0.csv"
    n = len(load_run(csv_dir).events)
    data = p.read_bytes()
    p.write_bytes(data[:-7])                 # cut mid-row, as a crash would
    (csv_dir / "trace" / "pebbles.r1.csv").write_bytes(
        (csv_dir / "trace" / "pebbles.r1.csv").read_bytes()[:-3])
    run = load_run(csv_dir)
    assert len(run.events) == n - 1
    assert sum("truncated last line" in w for w in run.warnings) == 2
    assert run.events["end"].notna().all()


@pytest.mark.parametrize("cut", [7, 200])
def test_torn_last_batch_is_dropped_and_the_rest_read(run_dir, cut):
    """A crash mid-write tears the last record batch of an Arrow stream (format 2): every
    complete batch (step) before it is read, the torn one dropped and said so, once."""
    p = run_dir / "trace" / "events.r0.arrows"
    whole = load_run(run_dir).events
    last = whole[(whole["rank"] == 0) & (whole["step"] == 2)]
    p.write_bytes(p.read_bytes()[:-(8 + cut)])   # the end-of-stream marker, and into the batch
    run = load_run(run_dir)
    assert len(run.events) == len(whole) - len(last)
    assert sum("truncated last batch" in w for w in run.warnings) == 1
    assert run.steps == [0, 1]


@pytest.mark.parametrize("status", ["running", "failed"])
def test_partial_run_status_and_missing_stats(csv_dir, status):
    run_dir = csv_dir
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["status"] = status
    meta["error"] = {"rank": 1, "type": "RuntimeError", "message": "boom"} \
        if status == "failed" else None
    (run_dir / "meta.json").write_text(json.dumps(meta))
    (run_dir / "stats.csv").unlink()
    # the last step of rank 1 never finished: drop its rows from the step onwards
    p = run_dir / "trace" / "events.r1.csv"
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:2] + [x for x in lines[2:] if not x.startswith("2,")]))
    r1 = run_dir / "ranks" / "stats.r1.csv"
    r1.write_bytes(r1.read_bytes()[:-4])
    run = load_run(run_dir)
    assert any(f"status is '{status}'" in w for w in run.warnings)
    assert status != "failed" or any("boom" in w for w in run.warnings)
    assert any("stats.csv absent" in w for w in run.warnings)
    assert any("stats.r1.csv: dropped a truncated" in w for w in run.warnings)
    assert len(run.stats) == 5
    assert run.steps == [0, 1]
    assert any("rank 1: step(s) 2 incomplete" in w for w in run.warnings)


def test_not_a_run_names_the_file(tmp_path):
    with pytest.raises(RunFormatError, match=r"meta\.json.*not a run directory"):
        load_run(tmp_path)


def test_unknown_trace_version_names_the_file(run_dir, csv_dir):
    p = csv_dir / "trace" / "pebbles.r0.csv"
    p.write_text(p.read_text().replace("format=1", "format=7", 1))
    with pytest.raises(RunFormatError, match=r"pebbles\.r0\.csv: unknown trace format version"):
        load_run(csv_dir)
    p = run_dir / "trace" / "pebbles.r0.arrows"    # format 2: the header in the schema
    data = p.read_bytes()
    assert data.count(b"format=2 kind=pebbles") == 1
    p.write_bytes(data.replace(b"format=2 kind=pebbles", b"format=7 kind=pebbles"))
    with pytest.raises(RunFormatError, match=r"pebbles\.r0\.arrows: unknown trace format"):
        load_run(run_dir)


def test_cli_partial_run_and_errors(run_dir, tmp_path, capsys):
    (run_dir / "trace" / "memory.r1.arrows").unlink()
    assert main([str(run_dir), "--format", "png", "-q"]) == 0
    out = capsys.readouterr()
    assert "warning: rank 1: trace/memory.r1.arrows missing" in out.err
    assert "bubble measured" in out.out
    got = {p.name for p in (run_dir / "analysis").iterdir()}
    assert {"metrics.json", "steps.csv", "trace.json", "pebble.png", "timeline.png",
            "memory.png"} <= got
    m = json.loads((run_dir / "analysis" / "metrics.json").read_text())
    assert m["warnings"] and m["steps"]["warmup"] == [0]
    assert np.isclose(m["pipeline"]["bubble_theory"], 1 / 3)       # gpipe p=2 m=2
    for f in ("pebble.png", "timeline.png", "memory.png"):
        (run_dir / "analysis" / f).unlink()
    os.utime(run_dir / "analysis" / "metrics.json", (0, 0))
    assert main([str(run_dir), "--format", "none", "-q"]) == 0     # re-run into its own folder
    got = {p.name for p in (run_dir / "analysis").iterdir()}
    assert (run_dir / "analysis" / "metrics.json").stat().st_mtime > 0     # written again
    assert not {g for g in got if g.endswith((".png", ".pdf"))}            # and no figure
    other = make_run(tmp_path / "other", p=2, steps=2)
    with pytest.raises(SystemExit, match="another run"):
        main([str(other), "--out", str(run_dir / "analysis"), "-q"])
    assert main([str(tmp_path / "nope"), "-q"]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("cli", ["pebble", "whatif", "compare", "figures"])
def test_a_format_matplotlib_cannot_write_is_one_line_before_any_work(run_dir, tmp_path, capsys,
                                                                      cli):
    import importlib
    args = {"pebble": [run_dir], "whatif": [run_dir, "m=4"], "compare": [run_dir, run_dir],
            "figures": [tmp_path]}[cli]
    out = tmp_path / "out"
    main_ = importlib.import_module(f"analysis.{cli}").main
    assert main_([*map(str, args), "--format", "png, PDF,none,jpgg", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --format png, PDF,none,jpgg: cannot write 'jpgg' (one of png, pdf, "
                   "svg, svgz, eps, ps, pgf, jpg, jpeg, tif, tiff, webp, or none)")
    assert not out.exists()


def test_the_formats_offered_are_ones_matplotlib_writes():
    from matplotlib.backend_bases import FigureCanvasBase

    from analysis.dims import FORMATS, figure_formats
    assert set(FORMATS) <= set(FigureCanvasBase.get_supported_filetypes())
    assert figure_formats(" PNG,pdf,png,, none") == ["png", "pdf"] and figure_formats("none") == []


def test_analysis_into_a_full_disk_is_one_line_naming_the_path(run_dir, tmp_path, capsys):
    from helpers import fill, small_tmpfs
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        assert main([str(run_dir), "--out", str(disk / "a"), "--format", "png", "-q"]) == 1
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and str(disk / "a") in lines[0] and "No space left" in lines[0]
        assert "Traceback" not in err
        assert not [p for p in (disk / "a").rglob("*") if p.stat().st_size == 0] if \
            (disk / "a").exists() else True


def _sizes(d):
    return {p.name: p.stat().st_size for p in d.iterdir()} if d.exists() else {}


def test_pdfs_drawn_in_a_child_onto_a_full_disk_are_one_line_and_no_half_file(run_dir, tmp_path,
                                                                              capfd):
    """matplotlib's PDF backend fails a second time while closing a file it could not write
    (zlib.error, AttributeError): in the forked child that draws, that was a traceback.
    capfd: the children write to file descriptor 2, not through this process's sys.stderr."""
    from helpers import fill, small_tmpfs
    args = ["--format", "pdf", "--no-trace", "-q"]
    capfd.readouterr()
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        out = disk / "a"
        assert main([str(run_dir), "--out", str(out), *args]) == 1
        err = capfd.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"error: cannot write {out}") and "No space left" in err, err
        left = _sizes(out)
    if left:    # no half file: what was written is whole (the sizes of a run onto free disk)
        assert main([str(run_dir), "--out", str(tmp_path / "ref"), *args]) == 0
        whole = _sizes(tmp_path / "ref")
        assert {n: s for n, s in left.items() if whole.get(n) != s} == {}


def test_outputs_that_fail_in_both_children_are_still_one_line(run_dir, capfd):
    """Here metrics.json and steps.csv are written, and each forked child fails (a directory
    stands where its figure goes): one error line in all, not one per process."""
    out = run_dir / "analysis"
    assert main([str(run_dir), "--format", "none", "--no-trace", "-q"]) == 0    # its folder
    for name in ("pebble.pdf", "timeline.pdf"):
        (out / name).mkdir()
    capfd.readouterr()
    assert main([str(run_dir), "--format", "pdf", "--no-trace", "-q"]) == 1
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {out}/"), err
    assert err[0].endswith(".pdf: Is a directory"), err


def test_step_out_of_range_writes_nothing(run_dir, capsys):
    assert main([str(run_dir), "--step", "99", "-q"]) == 2
    assert "--step 99: not in the run (steps 0..2)" in capsys.readouterr().err
    assert not (run_dir / "analysis").exists()


@pytest.mark.parametrize("damage, line", [
    (lambda ln: ln[:4] + '"' + ln[4:], 5),                          # a stray quote
    (lambda ln: ln + ",extra", 5),                                  # one field too many
    (lambda ln: ln.rsplit(",", 2)[0], 5),                           # fields missing
    (lambda ln: "x" + ln, 5),                                       # not a number
    (lambda ln: "," + ln.split(",", 1)[1], 5),                      # a required number empty
])
def test_damaged_rows_are_dropped_and_counted_naming_the_file(csv_dir, damage, line):
    run_dir = csv_dir
    p = run_dir / "trace" / "events.r0.csv"
    n = len(load_run(run_dir).events)
    lines = p.read_text().splitlines()
    lines[line - 1] = damage(lines[line - 1])
    p.write_text("\n".join(lines) + "\n")
    run = load_run(run_dir)
    assert len(run.events) == n - 1
    warn = [w for w in run.warnings if "malformed" in w]
    assert warn == [f"{p}: dropped 1 malformed row(s) (line {line})"]


def test_damaged_stats_rows_are_dropped_and_counted(run_dir):
    p = run_dir / "stats.csv"
    lines = p.read_text().splitlines()
    lines[2] = lines[2] + ',"'
    p.write_text("\n".join(lines) + "\n")
    run = load_run(run_dir)
    assert len(run.stats) == 5
    assert f"{p}: dropped 1 malformed row(s) (line 3)" in run.warnings


def test_divergence_looks_for_the_loss_on_the_rank_that_holds_it():
    """V placements (zbv, dualpipev) put the loss stage on rank 0: the last rank's empty loss
    is not divergence there, rank 0's is."""
    import pandas as pd

    from analysis.read.load import divergence
    nan = float("nan")
    stats = pd.DataFrame({"step": [0, 0], "rank": [0, 1], "loss": [2.3, nan],
                          "grad_norm": [1.0, 1.0]})
    v = {"world_size": 2, "schedule": {"placement": "v", "virtual": 2}}
    loop = {"world_size": 2, "schedule": {"placement": "loop", "virtual": 1}}
    assert divergence(stats, v) == []
    assert divergence(stats, loop) != []          # there the last rank holds the loss
    flipped = stats.assign(loss=[nan, 2.3])
    assert divergence(flipped, loop) == []
    assert divergence(flipped, v) == [
        "training diverged: non-finite loss or gradient norm from step 0 (rank 0, 1 rows)"]


def test_trace_written_in_a_child_equals_the_serial_one(run_dir, tmp_path, capsys):
    # the forked writer (default) and the in-process one (--serial) give the same bytes (the
    # figures the children draw beside it: test_stream's CLI test, forked against serial)
    for out, extra in ((tmp_path / "fork", []), (tmp_path / "serial", ["--serial"])):
        assert main([str(run_dir), "--out", str(out), "--format", "none", "-q", *extra]) == 0
    assert (tmp_path / "fork" / "trace.json").read_bytes() == \
        (tmp_path / "serial" / "trace.json").read_bytes()
    assert json.loads((tmp_path / "fork" / "trace.json").read_text())["traceEvents"]
    for name in ("metrics.json", "steps.csv"):
        assert (tmp_path / "fork" / name).stat().st_size > 0


@pytest.mark.parametrize("serial", [False, True])
def test_trace_that_cannot_be_written_is_one_error_line(run_dir, capsys, serial):
    # the forked writer's error comes back to this process: one line naming trace.json, exit
    # status 1, the other outputs written
    extra = ["--format", "none", "-q", *(["--serial"] if serial else [])]
    assert main([str(run_dir), *extra]) == 0
    out = run_dir / "analysis"
    (out / "trace.json").unlink()
    (out / "trace.json").mkdir()           # opening it for writing fails
    os.utime(out / "metrics.json", (0, 0))
    capsys.readouterr()
    assert main([str(run_dir), *extra]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "cannot write" in lines[0] and "trace.json" in lines[0], err
    assert "Traceback" not in err
    assert (out / "trace.json").is_dir() and (out / "metrics.json").stat().st_mtime > 0


def test_fast_reader_reads_what_pandas_reads(csv_dir):
    """pyarrow's reader (clean files) and pandas' (anything else) give the same frames: one
    rank's files with a comment line in the middle, which only pandas reads (as it always did),
    load as the clean ones do, text unified into one set of sorted categories; and the fast
    path reads NA strings as pandas does."""
    import pandas as pd
    from pandas._libs.parsers import STR_NA_VALUES

    from analysis.read.load import _NA_VALUES
    assert sorted(_NA_VALUES) == sorted(STR_NA_VALUES)
    run_dir = csv_dir
    clean = load_run(run_dir)
    for kind in ("events", "pebbles", "memory"):
        p = run_dir / "trace" / f"{kind}.r1.csv"
        lines = p.read_text().splitlines()
        p.write_text("\n".join(lines[:3] + ["# a comment"] + lines[3:]) + "\n")
    mixed = load_run(run_dir)
    assert mixed.warnings == clean.warnings == []
    for name in ("events", "pebbles", "memory", "stats"):
        pd.testing.assert_frame_equal(getattr(mixed, name), getattr(clean, name), check_exact=True)
    for col in ("kind", "pair"):
        cats = list(clean.events[col].cat.categories)
        assert cats == sorted(cats)
    assert isinstance(clean.memory["source"].dtype, pd.CategoricalDtype)
    assert clean.events["tb"].dtype == "float64" and clean.pebbles["module"].notna().all()


@pytest.mark.parametrize("serial", [False, True])
def test_a_trace_too_big_for_the_browser_gets_a_note(run_dir, capsys, monkeypatch, serial):
    # past BIG_TRACE bytes (1 GiB; here lowered to this run's size less one) stderr says how
    # to open trace.json; at or under it, nothing
    import analysis.pebble as P
    extra = ["--format", "none", "-q", *(["--serial"] if serial else [])]
    assert main([str(run_dir), *extra]) == 0
    assert "note:" not in capsys.readouterr().err
    size = (run_dir / "analysis" / "trace.json").stat().st_size
    monkeypatch.setattr(P, "BIG_TRACE", size)
    assert main([str(run_dir), *extra]) == 0
    assert "note:" not in capsys.readouterr().err        # exactly at the limit: no note
    monkeypatch.setattr(P, "BIG_TRACE", size - 1)
    assert main([str(run_dir), *extra]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "trace.json" in notes[0] and "trace_processor" in notes[0]
