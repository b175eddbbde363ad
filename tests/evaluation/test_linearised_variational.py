"""The linearised (GLM) predictive of a mean-field variational guide: ``J diag(sigma^2) J^T``
against dense Jacobian algebra, and an SVI run's ``--predictive glm``."""

import json

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_llm.data import EncodedDataset
from pyro_llm.evaluation.glm import glm_logit_moments, linearised_predict, probit_probs
from pyro_llm.guides import BLoBGuide
from pyro_llm.guides.ops import guide_median, guide_scales
from pyro_llm.evaluation import compute_metrics, predict_proba
from pyro_llm.infer import data_precisions, variances_at
from pyro_llm.runs import SVIConfig, evaluate, load_predictions, load_run, load_split, train
from linear_models import laplace_model_of


def _dense_covariance(model, guide, data, i):
    """``J diag(sigma^2) J^T`` of example ``i``, ``J`` by autograd through the site weights."""
    names = model.site_names
    batch = data.batch(torch.tensor([i]))
    values = {n: v.clone().requires_grad_(True) for n, v in guide_median(guide, batch).items() if n in names}
    logits = model.logits_at(batch, values)[0]
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(logits[c], [values[n] for n in names],
                                                                         retain_graph=True)])
                     for c in range(logits.shape[0])]).double()
    var = torch.cat([guide_scales(guide)[n].flatten() for n in names]).double().pow(2)
    return logits.detach().double(), (J * var) @ J.T


@pytest.mark.parametrize("kind", ["blob", "autonormal"])
def test_mean_field_glm_covariance_equals_dense_jacobian_algebra(tiny_llama, kind):
    model, data = laplace_model_of(tiny_llama)  # A and B sites at a point with B != 0
    sub = EncodedDataset(data.input_ids[:3], data.attention_mask[:3], data.labels[:3], data.choice_mask[:3])
    batch = sub.batch(torch.arange(3))
    if kind == "blob":
        guide = BLoBGuide(model)
        guide.flat_params()  # M from the sites' weights
        G = pyro.param("blob.G")
        with torch.no_grad():  # every entry its own scale, so a misplaced entry shows
            G.copy_(torch.rand(G.shape) * 0.5 + 0.05)
    else:  # Pyro's own mean-field guide, answered through its loc and scale
        guide = AutoNormal(model, init_scale=0.07, init_loc_fn=init_to_value(values=model.point_values()))
        guide(**batch)
    mean, cov = glm_logit_moments(guide, sub, model=model, progress=False)
    assert cov.shape == (1, 3, mean.shape[1], mean.shape[1])
    for i in range(3):
        logits, dense = _dense_covariance(model, guide, sub, i)
        # float32 Jacobians by two routes (output gradients x inputs against autograd through the weights)
        torch.testing.assert_close(cov[0, i], dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))
        torch.testing.assert_close(mean[i], logits)
    variances = cov[0].diagonal(dim1=-2, dim2=-1)
    assert variances[sub.choice_mask].min() > 0  # every choice's logit is uncertain
    # the probit predictive reads these moments
    probs = linearised_predict(guide, sub, model=model, progress=False)
    torch.testing.assert_close(probs, probit_probs(mean, cov[0]).float())


def test_glm_refuses_a_guide_without_a_gaussian_covariance(tiny_llama):
    model, data = laplace_model_of(tiny_llama)
    with pytest.raises(TypeError, match="needs a Gaussian guide"):
        glm_logit_moments(object(), data, model=model, progress=False)
    guide = BLoBGuide(model)
    guide.flat_params()
    with pytest.raises(ValueError, match="prior_precisions applies to a Laplace guide"):
        glm_logit_moments(guide, data, torch.tensor([1.0]), progress=False)


def _cfg(tiny_llama, guide):
    return SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(tiny_llama)}, "b_site": True,
                                "guide": {"name": guide, "blob_eps": 0.3}, "lora": {"rank": 4, "alpha": 8.0},
                                "data": {"train_limit": 16, "test_limit": 8, "max_length": 96},
                                "eval": {"samples": 2},
                                "optim": {"steps": 3, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 3}})


def test_an_svi_run_evaluates_its_guides_linearised_predictive(tiny_llama, tmp_path):
    train(_cfg(tiny_llama, "blob"), tmp_path / "blob", progress=False)
    glm = evaluate(tmp_path / "blob", predictive="glm", progress=False)
    recorded = json.loads((tmp_path / "blob" / "metrics.json").read_text())
    assert recorded["arc-easy/test/evaluate-glm-seed0"]["predictive"] == "glm"
    assert recorded["arc-easy/test/evaluate-glm-seed0"]["nll"] == pytest.approx(glm.nll)
    mean = evaluate(tmp_path / "blob", samples=0, progress=False)
    assert glm.nll != pytest.approx(mean.nll, rel=1e-6)  # the scales widened the predictive
    # the same predictive from the reloaded run's guide: the probit of its moments, which the scales
    # widen; with the scales at ~0, the mean's predictive
    run = load_run(tmp_path / "blob")
    data = load_split(run.config, run.task, "test", run.tokenizer, run.config.data.test_limit)
    mean_logits, cov = glm_logit_moments(run.guide, data, model=run.model, progress=False)
    torch.testing.assert_close(linearised_predict(run.guide, data, model=run.model, progress=False),
                               probit_probs(mean_logits, cov[0]).float())
    assert cov[0].diagonal(dim1=-2, dim2=-1)[data.choice_mask].min() > 1e-6
    with torch.no_grad():
        pyro.param("blob.G").fill_(1e-4)  # sigma = G^2 = 1e-8
    _, narrow_cov = glm_logit_moments(run.guide, data, model=run.model, progress=False)
    assert narrow_cov.abs().max() < 1e-12
    torch.testing.assert_close(linearised_predict(run.guide, data, model=run.model, progress=False),
                               predict_proba(run.model, run.guide, data, num_samples=0, progress=False),
                               rtol=1e-4, atol=1e-5)
    # the guide under another prior: the trained one's precision gives the guide's own predictive back;
    # the validation's choice is recorded with its grid, and predicts with its variances
    same = evaluate(tmp_path / "blob", predictive="glm", prior_precision=25.0, progress=False)  # N(0, 0.2^2)
    assert same.nll == pytest.approx(glm.nll, rel=1e-5)
    chosen = evaluate(tmp_path / "blob", predictive="glm", prior_precision="validation", progress=False)
    entry = json.loads((tmp_path / "blob" / "metrics.json").read_text())["arc-easy/test/evaluate-glm-priorval-seed0"]
    lam = entry["chosen_prior_precision"]
    assert entry["trained_prior_precision"] == pytest.approx(25.0) and f"{lam:g}" in entry["validation_nll"]
    assert entry["nll"] == pytest.approx(chosen.nll)
    run = load_run(tmp_path / "blob")
    d = data_precisions(guide_scales(run.guide), 25.0)
    probs = linearised_predict(run.guide, data, model=run.model, variances=[variances_at(d, lam)], progress=False)
    assert compute_metrics(probs, data.labels).nll == pytest.approx(chosen.nll, rel=1e-5)
    mc = evaluate(tmp_path / "blob", predictive="glm-mc", progress=False)
    assert abs(mc.accuracy - glm.accuracy) <= 100 / 8 and mc.nll != glm.nll  # its own predictive, recorded apart
    assert "arc-easy/test/evaluate-glm-mc-seed0" in json.loads((tmp_path / "blob" / "metrics.json").read_text())


def test_a_kl_weighted_run_is_read_under_another_prior_at_temperature_one(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, "blob")
    cfg.objective.kl_weight = 0.5  # a cold posterior: the likelihood counted twice against the prior
    train(cfg, tmp_path / "cold", progress=False)
    glm = evaluate(tmp_path / "cold", predictive="glm", progress=False)
    same_prior = evaluate(tmp_path / "cold", predictive="glm", prior_precision=25.0, progress=False)
    entry = json.loads((tmp_path / "cold" / "metrics.json").read_text())["arc-easy/test/evaluate-glm-prior25-seed0"]
    assert entry["trained_kl_weight"] == pytest.approx(0.5)
    run = load_run(tmp_path / "cold")
    data = load_split(run.config, run.task, "test", run.tokenizer, run.config.data.test_limit)
    recorded = load_predictions(tmp_path / "cold", "arc-easy/test/evaluate-glm-prior25-seed0")[0].double()
    cold, bayes = (linearised_predict(run.guide, data, model=run.model, progress=False,
                                      variances=[variances_at(data_precisions(guide_scales(run.guide), 25.0, w), 25.0)])
                   for w in (1.0, 0.5))
    # the temperature undone (the Bayesian posterior, every entry the data spoke for wider): the
    # predictions are those of the reading at w = 0.5, not the cold guide's own
    assert compute_metrics(cold, data.labels).nll == pytest.approx(glm.nll, rel=1e-6)
    gap = (bayes.double() - cold.double()).abs().max()
    assert gap > 0 and (recorded - bayes.double()).abs().max() < gap / 20
    assert same_prior.nll == pytest.approx(compute_metrics(bayes, data.labels).nll, rel=1e-6)


def test_the_linearised_predictive_of_a_point_guide_is_refused(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, "map")
    train(cfg, tmp_path / "map", progress=False)
    with pytest.raises(ValueError, match="needs a Gaussian guide"):
        evaluate(tmp_path / "map", predictive="glm", progress=False)
    with pytest.raises(ValueError, match="--samples applies to the N-sample predictive"):
        evaluate(tmp_path / "map", predictive="glm", samples=3, progress=False)
