"""PyTorch's own pipeline (torch.distributed.pipelining), measured with our instrument.

    names.py    the PyTorch names the instrument relies on, checked against the installed torch
    plan.py     PyTorch's planned step (pipeline_order) in our schedule IR: schedule.json
    build.py    PyTorch's schedule class for each of ours, built on our stage's chunks
"""
