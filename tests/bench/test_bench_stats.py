"""The statistics behind the benchmarks' ratios (``bench/common.py``)."""

import random
import statistics

import pytest
import torch

from bench.common import interleaved_samples, median_ci, ratio_summary


def test_median_ci_covers_the_median_at_its_level_for_a_skewed_distribution():
    # exponential noise (median log 2): the order-statistic interval must cover at >= 95 %, and not
    # far above (k is the largest admissible index: for n = 30 the exact coverage is 95.7 %)
    rng = random.Random(0)
    trials, n, median = 4000, 30, 0.6931471805599453
    covered = 0
    for _ in range(trials):
        lo, hi = median_ci([rng.expovariate(1.0) for _ in range(n)])
        covered += lo <= median <= hi
    assert 0.945 <= covered / trials <= 0.975


def test_median_ci_is_a_pair_of_order_statistics_around_the_median():
    values = [float(v) for v in random.Random(1).sample(range(1000), 30)]
    lo, hi = median_ci(values)
    xs = sorted(values)
    assert lo in values and hi in values and lo <= statistics.median(values) <= hi
    assert xs.index(lo) + 1 == len(xs) - xs.index(hi)  # symmetric ranks (k, n + 1 - k)
    assert median_ci(values, level=0.5)[1] - median_ci(values, level=0.5)[0] < hi - lo
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few values for 95 %: the whole range


def test_ratio_summary_pairs_rounds():
    times = {"a": [2.0, 3.0, 4.0, 10.0], "b": [1.0, 1.0, 2.0, 10.0]}
    s = ratio_summary(times, "a", "b")
    assert s["median"] == pytest.approx(statistics.median([2.0, 3.0, 2.0, 1.0]))
    assert s["ratios"] == [2.0, 3.0, 2.0, 1.0] and s["rounds"] == 4 and len(s["quartiles"]) == 3


def test_interleaved_samples_calls_each_once_per_round_in_shuffled_orders():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = interleaved_samples(fns, repeats=20, device=torch.device("cpu"), warmup=0)
    assert all(len(v) == 20 for v in times.values())
    rounds = [tuple(calls[i:i + 3]) for i in range(0, 60, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
