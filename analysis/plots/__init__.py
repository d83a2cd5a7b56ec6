"""Figures. Each function takes frames (and a figure or axes), draws with collections (a few
artists, not one per event), and returns (fig, axes); none reads a file or saves one."""
from analysis.plots.lessons import detach_lesson, requires_grad_lesson
from analysis.plots.memory import memory_plot
from analysis.plots.pebble import pebble_graph
from analysis.plots.timeline import planned_frame, timeline

__all__ = ["pebble_graph", "timeline", "planned_frame", "memory_plot", "requires_grad_lesson",
           "detach_lesson"]
