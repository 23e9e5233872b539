"""Evaluation scripts: perplexity parity, scorer calibration, kernel benchmarks."""
