"""A trained mean-field guide under another prior: the precisions' algebra in closed form, and the
search's one pass against one linearised pass per precision."""

import math
import warnings

import pyro
import pytest
import torch

from pyro_llm.data import EncodedDataset
from pyro_llm.evaluation import glm_logit_moments, probit_probs
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import data_precisions, search_prior_precision, variances_at
from linear_models import laplace_model_of


def test_precisions_are_the_prior_plus_the_likelihoods_share():
    torch.manual_seed(0)
    scales = {"a": torch.rand(3, 4) * 0.3 + 0.01, "b": torch.rand(4, 2) * 0.3 + 0.01}
    lam0 = 25.0  # scales above 1 / sqrt(25) = 0.2 leave the prior alone: no share for the likelihood
    d = data_precisions(scales, lam0)
    for n, s in scales.items():
        expected = torch.clamp(s.double() ** -2 - lam0, min=0.0)
        torch.testing.assert_close(d[n], expected, rtol=1e-12, atol=0.0)
        back = variances_at(d, lam0)[n]  # the trained prior gives the trained scales back (where s <= 0.2)
        inside = s <= 0.2
        torch.testing.assert_close(back[inside], s.double()[inside] ** 2, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(back[~inside], torch.full_like(back[~inside], 1 / lam0))
        wide = variances_at(d, 0.5)[n]  # a wider prior: every entry wider, bounded by the prior's 2
        torch.testing.assert_close(wide, 1.0 / (expected + 0.5), rtol=1e-12, atol=0.0)
        assert (wide >= back).all() and (wide <= 2.0).all()
    with pytest.raises(ValueError, match="prior_precision must be > 0"):
        variances_at(d, 0.0)


def test_search_scores_every_precision_as_its_own_linearised_pass(tiny_llama):
    model, data = laplace_model_of(tiny_llama)  # A and B sites, B != 0
    guide = BLoBGuide(model)
    guide.flat_params()
    with torch.no_grad():  # scales below the prior's 0.2, entry by entry
        pyro.param("blob.G").copy_(torch.rand(pyro.param("blob.G").shape) * 0.3 + 0.05)  # sigma = G^2 <= 0.1225
    val = EncodedDataset(data.input_ids[:6], data.attention_mask[:6], data.labels[:6], data.choice_mask[:6])
    grid = (0.1, 3.0, 300.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = search_prior_precision(guide, val, 25.0, grid=grid, batch_size=3)
    at_edge = found.prior_precision in (0.1, 300.0)
    assert at_edge == any("may fall further beyond the grid" in str(w.message) for w in caught)
    assert sorted(found.validation_nll) == [0.1, 3.0, 25.0, 300.0]  # the trained prior among the candidates
    d = data_precisions(guide.scales(), 25.0)
    for lam, nll in found.validation_nll.items():
        mean, cov = glm_logit_moments(guide, val, variances=[variances_at(d, lam)], batch_size=3, progress=False)
        own = -probit_probs(mean, cov[0]).gather(1, val.labels[:, None]).log().mean()
        assert nll == pytest.approx(float(own), rel=1e-9)
    assert found.prior_precision == min(found.validation_nll, key=found.validation_nll.get)
    assert len(set(found.validation_nll.values())) == 4  # the precision changes the predictive
    # at the trained precision, the guide's own linearised predictive
    mean, own_cov = glm_logit_moments(guide, val, batch_size=3, progress=False)
    _, at_trained = glm_logit_moments(guide, val, variances=[variances_at(d, 25.0)], batch_size=3, progress=False)
    torch.testing.assert_close(at_trained, own_cov, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(found.variances[model.site_names[0]],
                               variances_at(d, found.prior_precision)[model.site_names[0]])
    assert math.isfinite(found.validation_nll[found.prior_precision])


@pytest.mark.parametrize("w", [1.0, 0.1])
def test_a_kl_weighted_guide_is_read_at_temperature_one(w):
    # A quadratic log-likelihood of curvature h per entry and the KL to N(0, 1 / lam0) weighted by w:
    # the mean-field guide's scale that minimises E_q[-log lik] + w KL, found by an optimiser on the
    # objective written out here, is read back as h (the likelihood counted once), not h / w
    h, lam0 = torch.tensor([0.0, 3.0, 40.0, 900.0], dtype=torch.float64), 25.0
    log_s = torch.full_like(h, -1.0, requires_grad=True)
    opt = torch.optim.LBFGS([log_s], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        var = (2 * log_s).exp()
        kl = 0.5 * (lam0 * var - 1 - torch.log(lam0 * var))  # the means at 0: no mean term
        loss = (0.5 * h * var + w * kl).sum()
        loss.backward()
        return loss

    opt.step(objective)
    d = data_precisions({"a": log_s.detach().exp()}, lam0, kl_weight=w)["a"]
    torch.testing.assert_close(d, h, rtol=1e-6, atol=1e-6)
    # under the trained prior, the Bayesian posterior: wider than the cold one where the data speak
    bayes = variances_at({"a": d}, lam0)["a"]
    torch.testing.assert_close(bayes, 1 / (h + lam0), rtol=1e-6, atol=0.0)
    if w < 1:
        assert (bayes[1:] > log_s.detach()[1:].exp() ** 2 * 1.05).all()
    with pytest.raises(ValueError, match="kl_weight must be > 0"):
        data_precisions({"a": log_s.detach().exp()}, lam0, kl_weight=0.0)
