"""`trace.kineto=START:END`: a torch.profiler (Kineto) trace of steps START..END on every rank.

The profiler records CPU operators (and, on CUDA, kernels and memcpys) and our action ranges
(`PP:0F1`, harness.trace.ranges); the file is torch's Chrome-trace export,
`trace/kineto.r<R>.json`. Its timestamps are on Kineto's clock (µs); to put them on ours, the
window opens and closes with a few empty ranges named `harness:clock:<t>`, where t is our
trace clock (ns) just before the range began: offset = max over anchors of (t − ts·1000)
(a range starts after its stamp, so the largest difference is the least delayed).
analysis.read.kineto reads that back and merges the events into trace.json.
"""
from __future__ import annotations

from pathlib import Path

from ..runformat import kineto_file

ANCHOR = "harness:clock:"


class KinetoWindow:
    """Starts the profiler before step `start`, stops it after step `end` and exports."""

    def __init__(self, steps: tuple[int, int], base: Path, rank: int, device, now):
        self.start, self.end = steps
        self.path = Path(base) / kineto_file(rank)
        self.device, self.now, self.prof = device, now, None

    def _anchors(self, n: int = 3):
        from torch.profiler import record_function  # torch: not for the analysis (ANCHOR)
        for _ in range(n):
            with record_function(f"{ANCHOR}{self.now()}"):
                pass

    def before(self, step: int) -> None:
        if step != self.start or self.prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile  # as above: analysis imports us
        acts = [ProfilerActivity.CPU]
        if getattr(self.device, "type", "cpu") == "cuda":
            acts.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=acts, record_shapes=False)
        self.prof.__enter__()
        self._anchors()

    def after(self, step: int) -> None:
        if step >= self.end:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        self._anchors()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(self.path)
