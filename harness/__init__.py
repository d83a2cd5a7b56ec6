"""Naive model parallelism and pipeline schedules under MPI, measured.

`python -m harness.run` (run.py) trains one rank's stage; train.py is that run's loop, worker.py
its parts. The schedules are data (schedule/), run by the pipeline (core/) on block models
(models/), with the run directory, failures and test knobs around it (ops/) and the traces in
trace/. README "Layout" has one line per file.
"""
