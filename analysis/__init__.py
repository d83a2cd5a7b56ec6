"""Analysis of harness runs: load a run directory into tidy frames, compute what the pipeline
costs, draw it, export it. Entry point: `python -m analysis.pebble RUN`.

The layers, each using only those before it (tests/test_imports.py): `read` (files to frames, a
run of any length in chunks), `measure` (numbers from frames, pure functions), `predict` (the
what-if's model), then `metrics` (every number of a run), `stream` (the one pass over a run),
`plots` and `chrome` (figures and trace.json), and the command lines (`pebble`, `compare`,
`whatif`, `figures`)."""
from analysis.read.load import Run, RunFormatError, load_run

__all__ = ["load_run", "Run", "RunFormatError"]
