"""What torchrun tells its workers, read without importing torch (harness.run asks first)."""
from __future__ import annotations

import os

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def under_torchrun() -> bool:
    """Was this process started by torchrun (its elastic agent sets these)?"""
    return all(k in os.environ for k in TORCHRUN_VARS)


def rank_size() -> tuple[int, int]:
    """(rank, world size) as torchrun says, before any process group exists."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
