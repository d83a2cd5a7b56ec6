"""Block models the harness can split into pipeline stages (protocol in base.py, docs/models.md):
mlp.py the deep MLP of the seed, gpt.py a small GPT, gpt_memory.py what the GPT saves for
backward, derived from its code; digest.py a fingerprint of each block's initial weights."""
from harness.models.base import (BlockModel, ModelError, UserCodeError, block_generator,
                                 check_model, load_factory, param_counts, probe_shapes)

__all__ = ["BlockModel", "ModelError", "UserCodeError", "block_generator", "check_model",
           "load_factory", "param_counts", "probe_shapes"]
