"""What a run cost, as pure functions of its frames: intervals and step windows, waits, live
activations, stages and phases, the step table, the critical path and blame, exact medians of a
whole run (spill), the planned step, curves cut for figures (decimate). analysis.metrics gathers
them (with the what-if's simulated bubble, analysis.predict) into a run's numbers.
"""
