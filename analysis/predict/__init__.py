"""The what-if's model: a run's spans as the schedule's actions (actions), its costs calibrated
(calibrate, first, gaps), carried to another configuration (costs, target) and replayed
through the simulator (replay).
"""
