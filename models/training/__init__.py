"""The training pipeline: corpus and tokenizer, nanochat's optimizer recipe, the training loop with SNLP-aware
regularization and SNLP-forward fine-tuning, checkpoints that resume, and evaluation (perplexity, bits per byte,
agreement of SNLP plans with the sequential model)."""
