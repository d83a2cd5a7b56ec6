"""PyTorch's own pipeline (torch.distributed.pipelining), measured with our instrument.

    probe.py    the instrument: wraps one rank's stage and schedule instances, records spans,
                messages and pebbles in our trace format (no patch to PyTorch)
    plan.py     PyTorch's planned step (pipeline_order) in our schedule IR: schedule.json
    names.py    the PyTorch names the instrument relies on, checked against the installed torch
    build.py    PyTorch's schedule class for each of ours, built on our stage's chunks
    worker.py   one rank of `harness.run runtime=torch`: PyTorch's schedule class on our stages
    launch.py   `torchrun ... -m harness.run runtime=torch`: the config, gloo, our Run
    dist.py     our collectives (session, clocks) over torch.distributed, beside the pipeline's
    failure.py  the failure policy of a torchrun job
    env.py      what torchrun tells a worker (read before torch is imported)

docs/torchpipe.md says what is measured, how, and where PyTorch's operations limit it.
"""
