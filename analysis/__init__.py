"""Analysis of harness runs: load a run directory into tidy frames, compute what the pipeline
costs, draw it, export it. Entry point: `python -m analysis.pebble RUN`."""
from analysis.load import Run, RunFormatError, load_run

__all__ = ["load_run", "Run", "RunFormatError"]
