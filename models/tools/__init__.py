"""The tools over the library: the `snlp` command line, benchmarks and the demo. The only part of `models` that
imports `analysis` (for tables and plots of what the library computes)."""
