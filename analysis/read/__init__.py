"""Reading a run: each rank's trace files batch by batch (tracefile), the index and chunks of a run
of any length (scan), a whole run as frames (load), its small files (runmeta), the clocks
aligned (align), torch.profiler's traces on that clock (kineto).
"""
