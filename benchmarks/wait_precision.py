"""How late does a waiting rank see a message arrive, and how much CPU does it burn waiting?
`python -m benchmarks.wait_precision [--messages 300] [--bytes 65536]`

Runs `mpirun -n 2` on itself. Rank 1 posts a receive and tells rank 0, which busy-computes for
a delay (log-uniform, 20 µs .. 20 ms: the short waits of a deep pipeline and the long ones of a
naive one) and then sends, stamping the message with its clock (CLOCK_MONOTONIC, one clock for
both processes on one host). Rank 1 waits with harness.core.comm.Waiter in each comm.wait mode and
stamps the completion; lateness = completion - send stamp. Under `spin` that is MPI's transfer
time; what another mode adds to it is how late its completion timestamps are (the precision of
the trace's receive ends) and the latency it puts on the pipeline's critical path. CPU is
rank 1's process CPU time over wall time while waiting: 100 % means a core kept busy.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

MODES = [("spin", {}), ("sleep", {"poll_us": 50}),
         ("backoff", {"poll_us": 50, "spin_us": 200}), ("backoff", {"poll_us": 200, "spin_us": 200})]


def worker(n: int, nbytes: int) -> None:
    from mpi4py import MPI

    from harness.core.comm import Waiter
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    rng = np.random.default_rng(0)
    delays = np.exp(rng.uniform(np.log(20e-6), np.log(20e-3), n))
    buf = np.zeros(max(1, nbytes // 8), dtype=np.int64)
    ready = np.zeros(1, dtype=np.int64)
    rows = []
    for mode, kw in MODES:
        waiter = Waiter(mode, **kw)
        late, cpu, wall = [], 0.0, 0.0
        comm.Barrier()
        for i in range(n):
            if rank == 0:
                comm.Recv(ready, source=1, tag=1)
                until = time.perf_counter() + delays[i]
                while time.perf_counter() < until:  # the neighbour computes
                    pass
                buf[0] = time.perf_counter_ns()
                comm.Send(buf, dest=1, tag=0)
            else:
                req = comm.Irecv(buf, source=0, tag=0)
                c0, w0 = time.process_time(), time.perf_counter()
                comm.Send(ready, dest=0, tag=1)
                req.Wait() if waiter.blocking else waiter.wait(req)
                done = time.perf_counter_ns()
                cpu += time.process_time() - c0
                wall += time.perf_counter() - w0
                late.append((done - int(buf[0])) / 1e3)
        if rank == 1:
            late = np.array(late)
            short = delays < kw.get("spin_us", 0) * 1e-6
            rows.append((mode, kw, late, short, cpu / wall))
    if rank == 1:
        base = statistics.median(rows[0][2])
        print(f"{'comm.wait':>31} | lateness µs: {'median':>6} {'p90':>6} {'p99':>7} {'max':>7} "
              f"| +median {'short':>6} {'long':>6} | CPU while waiting")
        for mode, kw, late, short, cpu in rows:
            label = mode + "".join(f" {k}={v}" for k, v in kw.items())
            p = np.percentile(late, [50, 90, 99, 100])
            s = f"{np.median(late[short]) - base:6.1f}" if short.any() else f"{'-':>6}"
            lg = f"{np.median(late[~short]) - base:6.1f}"
            print(f"{label:>31} |              {p[0]:6.1f} {p[1]:6.1f} {p[2]:7.1f} {p[3]:7.1f} "
                  f"| {p[0] - base:7.1f} {s} {lg} | {cpu:5.0%}", flush=True)
        print(f"{n} messages of {buf.nbytes} B per mode; delays log-uniform 20 µs .. 20 ms; "
              f"'+median' is over spin's median ({base:.1f} µs), 'short' the waits shorter than "
              f"spin_us")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--bytes", type=int, default=65536)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.messages, a.bytes)
    from harness.ops.launch import mpirun
    cmd = [mpirun(), "-n", "2", sys.executable, "-m", "benchmarks.wait_precision", "--worker",
           f"--messages={a.messages}", f"--bytes={a.bytes}"]
    return subprocess.run(cmd, check=True).returncode


if __name__ == "__main__":
    main()
