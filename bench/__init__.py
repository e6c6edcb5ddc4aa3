"""Serving and audit benchmarks, each measured as a ratio against a reference in the same run.

``python -m bench.run [--full] [--only NAMES]`` (``make bench``) runs them and prints one table of
figure, reference, ratio, target and pass/fail; results go to ``bench/results/``.
"""
