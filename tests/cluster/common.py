"""What the cluster helpers share: the check that what they need is here (else a skip that names
it), commands that cannot outlive their timeout, daemons that die with the test, and killing
whatever is left of them."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def need(what: str, commands: dict[str, str]) -> dict[str, str]:
    """Skip (one line: what is missing, and the Debian package that brings it) unless this is
    root and every command is here. -> {command: its path}."""
    if os.geteuid() != 0:
        pytest.skip(f"{what}: needs root (namespaces, daemons); running as uid {os.geteuid()}")
    path = f"{os.environ.get('PATH', '')}:{SBIN}"
    found = {c: shutil.which(c, path=path) for c in commands}
    missing = [f"{c} (Debian package {commands[c]})" for c, p in found.items() if not p]
    if missing:
        pytest.skip(f"{what}: missing {', '.join(missing)}; .ci/run installs them with apt-get")
    return found


def child_setup() -> None:
    """In a child before exec: default signal dispositions (whatever the test runner inherited),
    and SIGTERM when the test process dies (prctl PR_SET_PDEATHSIG), so no daemon outlives it."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A daemon in the foreground, in a session of its own, its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True, preexec_fn=child_setup)


def run(argv: list[str], timeout: float, env: dict | None = None, cwd=None,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run to the end, or for `timeout` s: then kill it and all it started, and fail the test
    with what it printed (never a hang)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True, preexec_fn=child_setup)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill([proc.pid, *family(proc.pid)])
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process not found above still holds the pipes
            proc.kill()
            proc.wait(timeout=30)
            out, err = "", "(output lost: its pipes stayed open)"
        raise AssertionError(f"timed out after {timeout} s: {' '.join(argv)}\nstdout:\n{out}\n"
                             f"stderr:\n{err}") from None
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(argv)}\nstdout:\n{out}\n"
                             f"stderr:\n{err}")
    return done


def family(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill(pids, sig=signal.SIGKILL, wait_s: float = 10.0) -> None:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(sig)
            procs.append(p)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=wait_s)


def stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


def kill_where(match, wait_s: float = 10.0) -> list[str]:
    """SIGKILL every process for which match(psutil.Process) is true (not this one); -> their
    command lines, for a message."""
    hit = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if match(p):
                hit.append(p)
        except (psutil.Error, OSError):  # gone, or not ours to inspect (pid 1's namespaces)
            pass
    names = []
    for p in hit:
        try:
            names.append(" ".join(p.cmdline())[:120])
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(hit, timeout=wait_s)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ok, timeout: float, every: float = 0.2, log: Path | None = None):
    """Poll ok() until it returns something true; fail with `what` (and the log) at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = ok()
        if got:
            return got
        if time.monotonic() >= deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(every)
