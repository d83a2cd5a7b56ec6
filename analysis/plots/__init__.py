"""Figures. Each function takes frames (and a figure or axes), draws with collections (a few
artists, not one per event), and returns (fig, axes); none reads a file or saves one."""
from analysis.measure.plan import planned_frame  # the timeline's `planned` input
from analysis.plots.animate import frame_states, pebble_animation
from analysis.plots.compare import schedules_side_by_side
from analysis.plots.lessons import detach_lesson, requires_grad_lesson
from analysis.plots.memory import draw_memory, memory_plot
from analysis.plots.pebble import pebble_graph
from analysis.plots.sweep import breakdown_plot, bubble_plot, peak_memory_plot
from analysis.plots.timeline import timeline

__all__ = ["pebble_graph", "timeline", "planned_frame", "memory_plot", "draw_memory", "requires_grad_lesson",
           "detach_lesson", "schedules_side_by_side", "bubble_plot", "peak_memory_plot",
           "breakdown_plot", "frame_states", "pebble_animation"]
