"""The model: nanochat's GPT with the SNLP fork's options (no x0 blend, no value embeddings, mHC) and dynamic mHC;
its config; the block maths over layer-stacked weights that every path shares; hyper-connections; fusion; the
blocks as a layersolve system; and checkpoints in nanochat's format.

    from models import nanochat
    model = nanochat.load("runs/idn")        # model_<step>.pt + meta_<step>.json
    logits = model(idx)                      # the sequential forward
"""

from .checkpoint import CheckpointError, config_dict, load, neutral_defaults, paths, read_config, save, steps
from .config import GPTConfig
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "load", "save", "steps", "paths", "read_config", "neutral_defaults", "config_dict",
           "CheckpointError"]
