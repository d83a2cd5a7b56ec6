"""Two hosts on one machine (root only): node1 and node2, each an sshd in namespaces of its own.

- network: a veth pair joins them, interface `cl0` on both, 10.231.0.1 and 10.231.0.2/24 (a
  private range that exists only inside the two namespaces; nothing reaches the outside);
- mount: its own /tmp (a directory of the test's, bind-mounted; the other host cannot see it)
  and its own /etc/hosts naming both hosts;
- UTS: its own hostname.

The rest of the file system (the repository, the virtual environment) is the machine's, as a
cluster's shared home would be; /tmp, where the runs and their scratch directories are, is not
shared, except the repository, Python and the virtual environment where they themselves lie under
/tmp (as in CI, whose virtual environment is a `mktemp -d`): those are bound into each host's /tmp
at the same paths (`shared_under_tmp`). The namespaces live as long as their sshd: when it dies they go, and the veth pair with
them. Commands run "on" a host through nsenter (`on`); MPICH's hydra there starts the ranks over
ssh, one per host (`mpiexec`).

MPI over the veth: PyPI's MPICH picks its UCX netmod by default, and UCX sees that both "hosts"
are one machine and moves the data through shared memory, not the network. `MPI_ENV` selects
ch4:ofi with libfabric's tcp provider on `cl0`, as on hosts that share nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import common

NAMES = ("node1", "node2")
NET = "10.231.0"
IFACE = "cl0"
MPI_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": IFACE}
TOOLS = {"ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux", "mount": "mount",
         "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}

SSHD_CONFIG = """\
Port 22
HostKey /tmp/sshd/host_key
AuthorizedKeysFile /tmp/sshd/authorized_keys
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
"""
SSH_CONFIG = """\
Host *
  IdentityFile /tmp/sshd/id
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
"""
HOSTS = "127.0.0.1 localhost\n" + "".join(f"{NET}.{i + 1} {n}\n" for i, n in enumerate(NAMES))


class TwoHosts:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = [self.root / n for n in NAMES]   # each host's /tmp, as this process sees it
        self.sshd: list[subprocess.Popen] = []
        self.net_ns: list[str] = []

    # -- start and stop ------------------------------------------------------------------------
    def start(self) -> TwoHosts:
        self.bin = common.need("two hosts in namespaces", TOOLS)
        self._probe()
        self._files()
        for i, name in enumerate(NAMES):
            self._start_sshd(i, name)
        self._link()
        for i in range(len(NAMES)):  # sshd answers on every host, from node1
            common.wait_for(
                f"ssh from node1 to {NAMES[i]}",
                lambda i=i: self.on(0, ["/tmp/sshd/ssh", NAMES[i], "hostname"],
                                    timeout=20).stdout.strip() == NAMES[i],
                timeout=30, every=0.5, log=self.root / f"{NAMES[i]}.sshd.log")
        return self

    def stop(self) -> None:
        """Everything in the hosts' network namespaces (ranks, proxies, ssh sessions, sshd):
        SIGKILL. Their namespaces and the veth pair go with the last of them."""
        for ns in self.net_ns:
            common.kill_where(lambda p, ns=ns: os.readlink(f"/proc/{p.pid}/ns/net") == ns)
        for proc in self.sshd:
            common.stop(proc, grace_s=5)

    def _probe(self) -> None:
        import pytest
        p = common.run([self.bin["unshare"], "--net", "--mount", "--uts", "true"], timeout=20)
        if p.returncode != 0:
            pytest.skip(f"two hosts in namespaces: no network/mount/UTS namespaces here "
                        f"(unshare --net --mount --uts: {p.stderr.strip()})")
        a, b = self._veth_names()
        p = common.run([self.bin["ip"], "link", "add", a, "type", "veth", "peer", "name", b],
                       timeout=20)
        if p.returncode != 0:
            pytest.skip(f"two hosts in namespaces: no veth pairs here (ip link add type veth: "
                        f"{p.stderr.strip()})")
        common.run([self.bin["ip"], "link", "del", a], timeout=20, check=True)

    @staticmethod
    def _veth_names() -> tuple[str, str]:
        tag = f"pc{os.getpid() % 1000000}"  # unique on this machine; <= 15 characters
        return f"{tag}a", f"{tag}b"

    def _files(self) -> None:
        """Each host's /tmp: sshd's config and keys, ssh's, the hosts files."""
        key = self.root / "id"
        common.run([self.bin["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   timeout=30, check=True)
        for tmp in self.tmp:
            d = tmp / "sshd"
            d.mkdir(parents=True)
            common.run([self.bin["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f",
                        str(d / "host_key")], timeout=30, check=True)
            shutil.copy(key, d / "id")
            (d / "id").chmod(0o600)
            shutil.copy(key.with_suffix(".pub"), d / "authorized_keys")
            (d / "sshd_config").write_text(SSHD_CONFIG)
            (d / "ssh_config").write_text(SSH_CONFIG)
            wrapper = d / "ssh"  # what hydra runs to reach a host (-launcher-exec)
            wrapper.write_text(f'#!/bin/sh\nexec {self.bin["ssh"]} -F /tmp/sshd/ssh_config "$@"\n')
            wrapper.chmod(0o755)
            (tmp / "etc_hosts").write_text(HOSTS)
            (tmp / "hostfile").write_text("".join(f"{n}:1\n" for n in NAMES))

    def shared_under_tmp(self) -> list[Path]:
        """What the ranks run from (the repository, the virtual environment, Python itself) where
        it lies under /tmp, which each host replaces with its own: those paths are bound into
        each host's /tmp, as a cluster's shared home would hold them."""
        repo = Path(__file__).resolve().parents[2]
        tmp = Path("/tmp").resolve()
        roots = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, repo,
                                              Path(sys.executable).resolve().parent)}
        under = sorted(p for p in roots if p != tmp and tmp in p.parents)
        keep = [p for p in under if not any(q in p.parents for q in under)]
        for p in keep:
            if p == self.root.resolve() or p in self.root.resolve().parents:
                raise AssertionError(f"two hosts: the hosts' /tmp ({self.root}) lies inside {p}, "
                                     f"which they must share")
        return keep

    def _start_sshd(self, i: int, name: str) -> None:
        tmp = Path("/tmp").resolve()
        binds = ""
        for p in self.shared_under_tmp():
            at = self.tmp[i] / p.relative_to(tmp)
            at.mkdir(parents=True, exist_ok=True)
            binds += f"mount --bind {p} {at}; "
        script = (f"set -e; {binds}mount --rbind {self.tmp[i]} /tmp; mount --bind /tmp/etc_hosts "
                  f"/etc/hosts; hostname {name}; mkdir -p /run/sshd; "
                  f"exec {self.bin['sshd']} -D -e -f /tmp/sshd/sshd_config")
        log = self.root / f"{name}.sshd.log"
        proc = common.start([self.bin["unshare"], "--net", "--mount", "--uts", "--propagation",
                             "private", "--", "sh", "-c", script], log)
        self.sshd.append(proc)
        own = os.readlink("/proc/self/ns/net")

        def in_own_namespaces():
            if proc.poll() is not None:
                raise AssertionError(f"{name}: sshd exited {proc.returncode}:\n"
                                     f"{log.read_text(errors='replace')}")
            try:
                exe = os.readlink(f"/proc/{proc.pid}/exe")
                ns = os.readlink(f"/proc/{proc.pid}/ns/net")
            except OSError:
                return None
            return ns if ns != own and exe.endswith("sshd") else None

        self.net_ns.append(common.wait_for(f"{name}: sshd in its namespaces", in_own_namespaces,
                                           timeout=20, log=log))

    def _link(self) -> None:
        """The veth pair: one end into each host's network namespace, renamed cl0, addressed."""
        ip = self.bin["ip"]
        ends = self._veth_names()
        common.run([ip, "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]],
                   timeout=20, check=True)
        for i, end in enumerate(ends):
            common.run([ip, "link", "set", end, "netns", str(self.sshd[i].pid)], timeout=20,
                       check=True)
            for cmd in (["link", "set", end, "name", IFACE],
                        ["addr", "add", f"{NET}.{i + 1}/24", "dev", IFACE],
                        ["link", "set", IFACE, "up"], ["link", "set", "lo", "up"]):
                self.on(i, [ip, *cmd], timeout=20, check=True, mount=False)

    # -- use -----------------------------------------------------------------------------------
    def on(self, i: int, argv: list[str], timeout: float, env: dict | None = None,
           check: bool = False, mount: bool = True) -> subprocess.CompletedProcess:
        """Run argv on host i (its network, mount and UTS namespaces)."""
        ns = ["--net", "--mount", "--uts"] if mount else ["--net"]
        return common.run([self.bin["nsenter"], "--target", str(self.sshd[i].pid), *ns, "--",
                           *argv], timeout=timeout, env=env, check=check)

    def mpiexec(self, argv: list[str], timeout: float, env: dict | None = None):
        """`mpiexec -f hostfile -n 2 ARGV` on node1: hydra reaches node1 and node2 over ssh and
        starts one rank on each; the ranks' MPI traffic goes over cl0 (MPI_ENV)."""
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        env = dict(os.environ if env is None else env, **MPI_ENV)
        return self.on(0, [mpiexec, "-launcher", "ssh", "-launcher-exec", "/tmp/sshd/ssh",
                           "-f", "/tmp/hostfile", "-n", str(len(NAMES)), *argv],
                       timeout=timeout, env=env)

    def link_bytes(self, i: int) -> int:
        """Bytes received plus sent on host i's cl0 so far (/proc/PID/net/dev is the network
        namespace of that process)."""
        for line in Path(f"/proc/{self.sshd[i].pid}/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == IFACE:
                f = rest.split()
                return int(f[0]) + int(f[8])
        raise AssertionError(f"{NAMES[i]}: no {IFACE} in /proc/{self.sshd[i].pid}/net/dev")
