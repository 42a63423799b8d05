"""models: nanochat GPT and mHC models plugged into layersolve, and the `snlp` command.

The Transformer models, SNLP forward, decoding and training arrive with the models and training issues; for now
this package holds the command line and its toy demo."""
