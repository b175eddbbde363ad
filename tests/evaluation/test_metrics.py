import numpy as np
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
