"""Benchmarks users run: timing the analysis against bare forward passes, interleaved runs, peak memory."""
