"""Operations: what keeps a run honest and recoverable around the pipeline (harness.core).

    session.py      one rank's side of the run directory, from creation to completion
    rundir.py       the run directory: atomic writes, stats, the disk reserve, failure marks
    localdir.py     per-rank scratch directories and their checked transfer to rank 0
    failure.py      what a rank does when something goes wrong: say it once, record it, abort
    watchdog.py     a blocking call that outlives comm.timeout_s ends the job
    hang.py         what each rank is blocked on, and one diagnosis of who waits for whom
    heartbeat.py    per-rank heartbeats: telling a dead run from a live one afterwards
    signals.py      SIGTERM, SIGINT, SIGUSR1 ... taken by one thread
    malloc.py       the C allocator's policy for freed memory (malloc=keep|system)
    debug_knobs.py  test knobs (debug.*): failures, stalls, stragglers, wrong schedules
    launch.py       one `mpirun ... python -m harness.run` from Python (sweeps, benchmarks)
"""
