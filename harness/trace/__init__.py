"""Instrumentation: clocks and timers, pebbles (saved activations), memory samples, trace files."""


def open_trace(enabled: bool, run_dir, rank: int, timer, now, params, device,
               sample_interval_s: float):
    """The tracing objects of one rank -> (tracker, tracer, sampler, memory-source status).

    Tracing off: a NullTracker, a NullTracer, no sampler. The sampler is returned unstarted, so
    the caller decides when sampling begins (the harness: after the clocks are synchronised)."""
    # here, not at the top: the analysis imports harness.trace.clock and .kineto, and must not
    # load torch (pebbles) with them
    from . import memory, pebbles, writer
    if not enabled:
        return pebbles.NullTracker(), writer.NullTracer(), None, {}
    tracker = pebbles.PebbleTracker(timer.mark, params)  # pebbles on the spans' clock
    tracer = writer.Tracer(run_dir, rank, timer, tracker)
    readers, status = memory.open_sources(device)
    sampler = memory.MemorySampler(readers, now, tracer.memory.write_rows, sample_interval_s)
    return tracker, tracer, sampler, status
