"""Memory samples from a background thread: process RSS (psutil) always; on a GPU also torch's
caching-allocator counters and NVML's device and per-process figures.

A source that cannot be read (no NVML library, no GPU, a driver error) is dropped and the reason
recorded — measuring must never stop the run. NVML and CUDA parts are not verified on hardware.
"""
from __future__ import annotations

import os
import threading

import psutil


def _rss_source():
    proc = psutil.Process(os.getpid())
    return lambda: proc.memory_info().rss


def _nvml_sources(device_index: int):
    import pynvml  # the nvidia-ml-py distribution
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    pid = os.getpid()

    def used():
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    def process():
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return 0  # this process has no context on the device yet

    return {"nvml_used": used, "nvml_process": process}


def open_sources(device) -> tuple[dict, dict]:
    """-> (name -> zero-argument reader, name -> "ok" or "unavailable: why")."""
    readers, status = {}, {}

    def add(name, make):
        try:
            got = make()
            got = got if isinstance(got, dict) else {name: got}
            for n, fn in got.items():
                fn()  # one trial read: fail here, not in the thread
                readers[n] = fn
                status[n] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure just makes the source unavailable
            status[name] = f"unavailable: {type(e).__name__}: {e}".strip()

    add("rss", _rss_source)
    if getattr(device, "type", "cpu") == "cuda":
        import torch  # a CUDA device only (the sampler's module is imported without it)
        idx = device.index if device.index is not None else torch.cuda.current_device()
        add("cuda_allocated", lambda: (lambda: torch.cuda.memory_allocated(idx)))
        add("cuda_reserved", lambda: (lambda: torch.cuda.memory_reserved(idx)))
        add("nvml", lambda: _nvml_sources(idx))
    else:
        status["nvml"] = "unavailable: CPU run"
    return readers, status


class MemorySampler(threading.Thread):
    """Samples every `interval_s` into `out` (a trace file writer) until `stop()`."""

    def __init__(self, readers: dict, now, write_rows, interval_s: float):
        super().__init__(name="memory-sampler", daemon=True)
        self.readers, self.now, self.write_rows = readers, now, write_rows
        self.interval = interval_s
        self._stop_evt = threading.Event()
        self.samples = 0

    def run(self):
        rows, flush_every = [], max(1, int(0.25 / self.interval))  # flush ~4 times a second
        dead = set()
        # one sample at start, one every interval, one at stop: even a run shorter than the
        # interval has its memory at both ends
        stopping = False
        while True:
            t = self.now()
            for name, read in self.readers.items():
                if name in dead:
                    continue
                try:
                    rows.append((t, name, read()))
                except Exception:  # noqa: BLE001 - a source that fails mid-run stops, the run goes on
                    dead.add(name)
            self.samples += 1
            if self.samples % flush_every == 0:
                self.write_rows(rows)
                rows = []
            if stopping:
                break
            stopping = self._stop_evt.wait(self.interval)
        self.write_rows(rows)

    def stop(self):
        self._stop_evt.set()
        self.join(timeout=5)
