import numpy as np
import pytest
import torch

from pyro_llm.evaluation import compute_metrics, reliability_bins


def _ece_numpy(probs, labels, bins):
    conf = probs.max(1)
    pred = probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return 100 * ece


def test_metrics_match_independent_numpy():
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(500, 4, generator=gen), -1)
    labels = torch.randint(0, 4, (500,), generator=gen)
    m = compute_metrics(probs, labels, n_bins=15)
    p, y = probs.double().numpy(), labels.numpy()
    assert abs(m.accuracy - 100 * (p.argmax(1) == y).mean()) < 1e-9
    assert abs(m.nll - (-np.log(p[np.arange(500), y]).mean())) < 1e-9
    assert abs(m.brier - ((p - np.eye(4)[y]) ** 2).sum(1).mean()) < 1e-9
    assert abs(m.ece - _ece_numpy(p, y, 15)) < 1e-3
    assert abs(compute_metrics(probs, labels, n_bins=10).ece - _ece_numpy(p, y, 10)) < 1e-3


def test_perfectly_calibrated_predictions_have_small_ece():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(20000, 3, generator=gen), -1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    assert compute_metrics(probs, labels).ece < 1.5
    edges, conf, acc, count = reliability_bins(probs, labels, 10)
    assert int(count.sum()) == 20000 and torch.allclose(conf[count > 500], acc[count > 500], atol=0.05)


def test_temperature_scaling_recovers_the_generating_temperature():
    from pyro_llm.evaluation import fit_temperature

    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4000, 4, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=gen).squeeze(1)
    assert abs(fit_temperature(logits, labels) - 2.5) < 0.2


def test_paired_bootstrap_matches_scipy_and_says_when_a_difference_is_real():
    """The NLL difference's interval agrees with scipy's paired percentile bootstrap (an independent
    implementation; the random streams differ, so within a tenth of the width); identical
    predictives give exactly zero; a clearly better predictive's interval excludes zero."""
    from scipy import stats

    from pyro_llm.evaluation import paired_bootstrap

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=gen)
    a = torch.softmax(torch.randn(400, 3, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, 3), -1)
    b = torch.softmax(torch.randn(400, 3, generator=gen) + 0.5 * torch.nn.functional.one_hot(labels, 3), -1)
    ours = paired_bootstrap(a, b, labels, resamples=2000, metrics=("nll", "accuracy"))["nll"]
    nll_a = -a.double().gather(1, labels[:, None]).log().squeeze(1).numpy()
    nll_b = -b.double().gather(1, labels[:, None]).log().squeeze(1).numpy()
    ref = stats.bootstrap((nll_a, nll_b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True,
                          method="percentile", n_resamples=2000, random_state=1).confidence_interval
    width = ref.high - ref.low
    assert abs(ours.low - ref.low) < 0.1 * width and abs(ours.high - ref.high) < 0.1 * width
    assert abs(ours.difference - (nll_a.mean() - nll_b.mean())) < 1e-9
    assert ours.excludes_zero and ours.difference < 0
    same = paired_bootstrap(a, a, labels, resamples=50)
    assert all(d.difference == d.low == d.high == 0 for d in same.values())


def test_paired_bootstrap_scores_every_resample_as_compute_metrics_does():
    """Each resample's metrics are weighted sums (ECE per torchmetrics bin); the intervals equal those
    of scoring every resampled set with compute_metrics (torchmetrics' ECE), resample by resample,
    including confidences of exactly 1 (a bin of their own) and ties broken alike."""
    from pyro_llm.evaluation import compute_metrics, paired_bootstrap

    gen = torch.Generator().manual_seed(1)
    n, resamples = 150, 200
    labels = torch.randint(0, 4, (n,), generator=gen)
    a = torch.softmax(3 * torch.randn(n, 4, generator=gen), -1)
    b = torch.softmax(torch.randn(n, 4, generator=gen) + torch.nn.functional.one_hot(labels, 4), -1)
    a[:10] = torch.nn.functional.one_hot(torch.randint(0, 4, (10,), generator=gen), 4).float()  # confidence 1
    ours = paired_bootstrap(a, b, labels, resamples=resamples, seed=3)
    draws = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(3))
    metrics = ("accuracy", "ece", "nll", "brier")

    def diff(i):
        ma, mb = compute_metrics(a[i], labels[i]), compute_metrics(b[i], labels[i])
        return [getattr(ma, m) - getattr(mb, m) for m in metrics]

    ref = torch.tensor([diff(i) for i in draws], dtype=torch.float64)
    bounds = torch.quantile(ref, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    whole = diff(slice(None))
    for k, m in enumerate(metrics):  # ECE is float32 in torchmetrics: equal to its rounding, in percent
        assert ours[m].difference == pytest.approx(whole[k], abs=1e-4)
        assert (ours[m].low, ours[m].high) == pytest.approx((float(bounds[0, k]), float(bounds[1, k])), abs=1e-4)
    assert ours["ece"].high - ours["ece"].low > 1  # the intervals have width: the resamples differ
