"""Experiment definitions (`<name>.yaml`, selected with `exp=<name>`) and the paper workflow."""
