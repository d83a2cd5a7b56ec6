"""harness.core.comm.Waiter: how a rank waits for a posted request (comm.wait). The sleeps are
recorded instead of slept, so the policy is checked exactly, without timing anything."""
import pytest

from harness.core import comm


class Req:
    """An MPI request stand-in that completes on the n-th Test()."""

    def __init__(self, n):
        self.n, self.tests = n, 0

    def Test(self):
        self.tests += 1
        return self.tests >= self.n


@pytest.fixture
def naps(monkeypatch):
    slept = []
    monkeypatch.setattr(comm.time, "sleep", slept.append)
    return slept


def test_backoff_spins_first_then_doubles_its_sleeps_up_to_poll_us(naps):
    w = comm.Waiter("backoff", poll_us=50, spin_us=0)
    r = Req(8)
    w.wait(r)
    assert r.tests == 8
    # spin_us=0: one test in the spin phase, then 10, 20, 40 µs and the 50 µs cap
    assert naps == pytest.approx([10e-6, 20e-6, 40e-6, 50e-6, 50e-6, 50e-6])


def test_backoff_sees_a_short_wait_complete_without_sleeping(naps):
    w = comm.Waiter("backoff", poll_us=50, spin_us=1e6)  # a second of spinning: never reached
    r = Req(1000)
    w.wait(r)
    assert r.tests == 1000 and naps == []


def test_sleep_naps_poll_us_every_time(naps):
    w = comm.Waiter("sleep", poll_us=30)
    w.spin_s = 0.0  # skip its ~20 µs spin, to count the naps exactly
    w.wait(Req(5))
    assert naps == pytest.approx([30e-6] * 3)


def test_spin_means_mpis_blocking_call_and_unknown_modes_are_refused():
    assert comm.Waiter("spin").blocking and not comm.Waiter("backoff").blocking
    with pytest.raises(ValueError, match="comm.wait='poll': allowed spin, sleep, backoff"):
        comm.Waiter("poll")
