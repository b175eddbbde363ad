"""Benchmarks and the results study, run as modules from the project root
(``python -m bench.bench_blob``, ``python -m bench.study``): ratios against a baseline measured in
the same run, JSON under ``bench/results/``."""
