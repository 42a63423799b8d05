"""models: nanochat GPT and mHC plugged into layersolve.

    nanochat/   the model: config, modules, block maths, hyper-connections, fusion, checkpoints
    hf/         Hugging Face causal LMs (Llama, Mistral, Qwen2/3, Gemma2/3) as the same kind of model ([hf] extra)
    inference/  SNLP over the model: plans, the layer-parallel forward, KV-cache decoding
    training/   corpus, tokenizer, optimizer, training loop, regularizer, evaluation
    tools/      the `snlp` command, benchmarks, demo (the only room that imports `analysis`)
    io.py       atomic writes

Imports run down: tools -> training -> inference -> hf -> nanochat -> layersolve, never back up. The two names most
code needs are re-exported: `from models import nanochat, snlp`.
"""

from . import nanochat
from .inference import snlp

__all__ = ["nanochat", "snlp"]
