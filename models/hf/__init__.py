"""Off-the-shelf Hugging Face causal LMs (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3) under the same SNLP plans,
decoders and evaluation as nanochat's models. Needs the `[hf]` extra (transformers).

    from models import hf, snlp
    model, tokenizer = hf.load("path/to/model")      # a local directory: weights, config, tokenizer
    out = snlp.forward(model, idx, snlp.Plan(n_par=12, iters=2))
"""

from .adapter import SUPPORTED, HFConfig, HFModel, UnsupportedModel
from .load import HFLoadError, HFTokenizer, load, load_stage, load_tokenizer, smollm2_directory, SMOLLM2_INSTALL

__all__ = ["HFModel", "HFConfig", "HFTokenizer", "HFLoadError", "load", "load_stage", "load_tokenizer", "smollm2_directory", "SMOLLM2_INSTALL", "SUPPORTED", "UnsupportedModel"]
