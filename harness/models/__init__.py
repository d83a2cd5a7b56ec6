"""Block models the harness can split into pipeline stages (protocol in base.py, docs/models.md)."""
from harness.models.base import (BlockModel, block_generator, check_model, load_factory,
                                 param_counts, probe_shapes)

__all__ = ["BlockModel", "block_generator", "check_model", "load_factory", "param_counts",
           "probe_shapes"]
