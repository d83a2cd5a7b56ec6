"""Instrumentation: clocks and timers, pebbles (saved activations), memory samples, trace files."""
