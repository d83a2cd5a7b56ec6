"""A one-node Slurm cluster on this machine (root only): munged, slurmctld and slurmd from
Debian's munge and slurm-wlm (22.05 on bookworm), run in the foreground by the test.

Everything is in a directory of the test's: the munge key and socket, slurm.conf, the state and
spool directories, the logs; the daemons listen on free ports of their own, and every command
finds the cluster through SLURM_CONF. Nothing of /etc is read or written, so a machine's own
Slurm or munge (if any) is left alone. The node claims 8 CPUs on whatever the machine has
(SlurmdParameters=config_overrides), so that jobs that wait for Slurm's clock can run beside the
others. `stop` cancels the jobs, stops the daemons, and SIGKILLs whatever is left that carries
this cluster's SLURM_CONF in its environment (job steps' slurmstepd and tasks).

Job ids start at a random FirstJobId: under srun, MPICH names its node's shared memory
(/dev/shm/mpich_shm_<hash>_<node>) after the PMI KVS name, i.e. the job and step id, and a job
killed before MPI_Finalize leaves it behind. A fresh cluster numbering from 1 again reused those
ids, and its steps attached to the stale segments and failed in MPI_Init ("Message from rank 1
and tag 7 truncated", or UCX's "failed to unpack address, invalid bandwidth 0.00") or hung:
seen for job ids 1 and 8 in every fresh cluster, 2 of 30 sruns; none in 30 with random ids.
"""
from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

from . import common

SLURM = "slurm-wlm"
TOOLS = {"munged": "munge", "slurmctld": SLURM, "slurmd": SLURM, "srun": SLURM, "salloc": SLURM,
         "sbatch": SLURM, "scontrol": SLURM, "squeue": SLURM, "scancel": SLURM, "sinfo": SLURM}
CPUS = 8
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING")

CONF = """\
ClusterName=pipetest
FirstJobId={first_job}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# a finished job's record stays this long (s; Slurm's default 300): the sbatch jobs are
# submitted before the suite's first test and read when their test comes, minutes later
MinJobAge=3600
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    def __init__(self, root: Path, repo: Path):
        self.root, self.repo = Path(root), Path(repo)
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.daemons = []

    def env(self) -> dict:
        """What every command (and the daemons) runs with: this cluster, this venv first."""
        venv = str(Path(sys.executable).parent)
        return dict(os.environ, SLURM_CONF=str(self.conf), PYTHONPATH=str(self.repo),
                    PATH=f"{venv}:{os.environ.get('PATH', '')}:{common.SBIN}")

    # -- start and stop ------------------------------------------------------------------------
    def start(self) -> Slurm:
        self.bin = common.need("a one-node Slurm cluster", TOOLS)
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self.conf.write_text(CONF.format(node=self.node, root=r, cpus=CPUS,
                                         first_job=random.randrange(1000, 60_000_000),
                                         ctld_port=common.free_port(), d_port=common.free_port()))
        env = self.env()
        # -f: run as root and accept the test's directory permissions
        self.daemons.append(common.start(
            [self.bin["munged"], "-F", "-f", f"--key-file={key}", f"--socket={r}/munge.socket",
             f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log",
             f"--seed-file={r}/munged.seed"], r / "munged.out", env))
        common.wait_for("munged's socket", (r / "munge.socket").exists, timeout=20,
                        log=r / "munged.out")
        self.daemons.append(common.start([self.bin["slurmctld"], "-D", "-f", str(self.conf)],
                                         r / "slurmctld.out", env))
        self.daemons.append(common.start([self.bin["slurmd"], "-D", "-f", str(self.conf), "-N",
                                          self.node], r / "slurmd.out", env))
        common.wait_for("the node idle in sinfo", self._idle, timeout=60, every=0.5,
                        log=r / "slurmctld.log")
        return self

    def _idle(self) -> bool:
        for d in self.daemons:
            if d.poll() is not None:
                raise AssertionError(f"{d.args[0]} exited {d.returncode}:\n" + "\n".join(
                    p.read_text(errors="replace")[-2000:] for p in self.root.glob("*.out")))
        p = self.run([self.bin["sinfo"], "-h", "-N", "-o", "%T"], timeout=20)
        return p.returncode == 0 and p.stdout.strip() == "idle"

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons, kill what is left; -> what had to be killed."""
        ctld = self.daemons[1] if len(self.daemons) > 1 else None
        if ctld is not None and ctld.poll() is None:
            squeue = [self.bin["squeue"], "-h", "-o", "%i"]
            jobs = self.run(squeue, timeout=20).stdout.split()
            if jobs:
                self.run([self.bin["scancel"], *jobs], timeout=20)
                try:
                    common.wait_for("jobs cancelled",
                                    lambda: not self.run(squeue, timeout=20).stdout.split(),
                                    timeout=15, every=0.5)
                except AssertionError:
                    pass  # what is left is killed below
        for d in reversed(self.daemons):  # slurmd, slurmctld, munged
            common.stop(d, grace_s=10)
        return common.kill_where(lambda p: p.environ().get("SLURM_CONF") == str(self.conf))

    # -- use -----------------------------------------------------------------------------------
    def run(self, argv: list[str], timeout: float, check: bool = False):
        return common.run(argv, timeout=timeout, env=self.env(), cwd=self.repo, check=check)

    def sbatch(self, name: str, script: str) -> str:
        """Submit `script` (its #SBATCH lines and all) as job `name`; -> the job id. Its output
        goes to ROOT/<name>-<id>.out (`output`)."""
        path = self.root / f"{name}.sh"
        path.write_text(script)
        p = self.run([self.bin["sbatch"], "--parsable", f"--job-name={name}",
                      f"--output={self.root}/%x-%j.out", str(path)], timeout=30, check=True)
        return p.stdout.strip().split(";")[0]

    def output(self, name: str, job: str) -> str:
        return (self.root / f"{name}-{job}.out").read_text(errors="replace")

    def state(self, job: str) -> str:
        p = self.run([self.bin["scontrol"], "show", "job", "-o", job], timeout=20, check=True)
        return next(f.split("=", 1)[1] for f in p.stdout.split() if f.startswith("JobState="))

    def wait(self, job: str, timeout: float) -> str:
        """Until the job has ended; -> its final state (COMPLETED, FAILED, TIMEOUT, ...)."""
        return common.wait_for(f"job {job} to end", lambda: (s := self.state(job)) not in ACTIVE
                               and s, timeout=timeout, every=1.0, log=self.root / "slurmctld.log")
