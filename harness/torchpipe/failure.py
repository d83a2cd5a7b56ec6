"""The failure policy of a job torchrun started: our policy (harness.ops.failure), ending the
job the way torchrun does.

There is no MPI_Abort: a rank that fails records it in meta.json, says it once, and exits;
torchrun's agent sees a worker exit non-zero and stops the others with SIGTERM. Before that
they may see the failure themselves, as a gloo error in the receive they were waiting on (the
peer's sockets closed). Those are consequences, not causes: a rank whose error or signal comes
after another rank recorded its failure logs it to its own file and exits without a word on
stderr, so the job ends with the one line of the rank that failed first.
"""
from __future__ import annotations

import time

import torch.distributed as dist

from ..ops.failure import FailurePolicy


class TorchFailurePolicy(FailurePolicy):

    @staticmethod
    def comm_error(e: BaseException) -> bool:
        """A torch.distributed (gloo) error: what a peer's exit causes in a pending receive."""
        return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))

    def _after(self, what: str, code: int, settle_s: float = 0.0):
        """If another rank failed first (looking for up to settle_s): log `what` as its
        consequence to this rank's own file and end this process quietly; else return."""
        deadline = time.monotonic() + settle_s
        while True:
            first = self.other_failed()
            if first or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not first:
            return
        try:
            self.session.files.log(f"FAILED: {first}; then {what}")
        except Exception:  # noqa: BLE001 - the cause is recorded; this is a courtesy
            pass
        self.comm.abort(code)

    def on_exception(self, e: BaseException) -> int:
        if self.size > 1:
            first_line = str(e).splitlines()[0] if str(e) else ""
            self._after(f"this rank failed: {type(e).__name__}: {first_line}", 1,
                        2.0 if self.comm_error(e) else 0.0)
        return super().on_exception(e)

    def on_signal(self, name: str, signum: int):
        if not self.done and self.size > 1:
            self._after(f"it was terminated by {name}", 128 + signum)
        super().on_signal(name, signum)
