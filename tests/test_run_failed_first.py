"""A rank whose communication breaks because another rank failed first names that rank's failure
in one line (harness.ops.failure.FailurePolicy.failed_first) instead of printing its own MPI
traceback, which would bury the cause. The race behind it (a rank aborts while its peer is
copying from its memory) is too rare to provoke under mpirun reliably, so the decision is tested
here on real files and a real mpi4py exception."""
import json

import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from harness.ops.failure import FailurePolicy  # noqa: E402
from harness.ops.session import Session  # noqa: E402


def _policy(rank):
    return FailurePolicy(None, rank, 2, Session(None, rank, 2))


def _run(tmp_path, rank, error):
    (tmp_path / "meta.json").write_text(json.dumps(
        {"status": "failed", "error": error} if error else {"status": "running"}))
    r = _policy(rank)
    r.session.run_dir = tmp_path
    return r


def test_an_mpi_error_after_another_ranks_failure_names_that_failure(tmp_path):
    r = _run(tmp_path, 1, {"rank": 0, "type": "Terminated",
                           "message": "terminated by SIGHUP at step 3"})
    said = r.failed_first(MPI.Exception(MPI.ERR_OTHER))
    assert said == "rank 0 failed first (Terminated: terminated by SIGHUP at step 3)"


@pytest.mark.parametrize("error, exc", [
    (None, "mpi"),                                               # nobody failed yet
    ({"rank": 1, "type": "ValueError", "message": "x"}, "mpi"),  # this rank's own failure
    ({"rank": 0, "type": "Terminated", "message": "x"}, "other"),  # not a communication error
])
def test_otherwise_the_error_is_this_ranks_own(tmp_path, error, exc):
    r = _run(tmp_path, 1, error)
    e = MPI.Exception(MPI.ERR_OTHER) if exc == "mpi" else RuntimeError("boom")
    assert r.failed_first(e) is None


def test_without_a_readable_run_directory_there_is_no_judgement(tmp_path):
    r = _policy(1)
    assert r.failed_first(MPI.Exception(MPI.ERR_OTHER)) is None  # run_dir unknown
    r.session.run_dir = tmp_path  # no meta.json
    assert r.failed_first(MPI.Exception(MPI.ERR_OTHER)) is None


def test_an_mpi_error_waits_a_moment_for_the_cause_to_show(tmp_path):
    """The peer's failure reaches meta.json after this rank's MPI error: looked for again."""
    import threading
    r = _run(tmp_path, 1, None)
    r.session.bases = None
    late = {"status": "failed", "error": {"rank": 0, "type": "Terminated", "message": "x"}}
    t = threading.Timer(0.3, lambda: (tmp_path / "meta.json").write_text(json.dumps(late)))
    t.start()
    died, first = r.peer_cause(MPI.Exception(MPI.ERR_OTHER), settle_s=5.0)
    t.join()
    assert died is None and first == "rank 0 failed first (Terminated: x)"
    # any other exception is judged at once
    (tmp_path / "meta.json").write_text(json.dumps({"status": "running"}))
    assert r.peer_cause(RuntimeError("boom"), settle_s=5.0) == (None, None)
