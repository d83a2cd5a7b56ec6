"""The pipeline itself: what a rank computes and sends in a training step.

    executor.py   runs one rank's action list (harness.schedule) through a dispatch table
    comm.py       all MPI traffic, timed and traced in one place
    stage.py      one rank's stage of any block model: blocks, loss, data, boundary shapes
    splitgrad.py  split backward (input gradient now, weight gradient later) for any block
    sgd.py        the stage's optimizer: torch's functional SGD, without torch._dynamo's import

The schedules these run are data in harness.schedule; the models in harness.models.
"""
