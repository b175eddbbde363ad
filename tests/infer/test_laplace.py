"""Laplace-LoRA: K-FAC, the structured posterior against dense algebra, sampling, evidence, GLM."""

import math

import pyro
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from pyro_llm.curvature import EigenFactor, KFACConfig, KronBlock
from pyro_llm.data import EncodedDataset
from pyro_llm.evaluation.glm import glm_logit_moments, mc_probs, probit_probs
from pyro_llm.guides import LaplaceGuide
from pyro_llm.io import ALIASES_KEY, CorruptFileError, load_tensors
from pyro_llm.infer.laplace import fit_laplace, optimize_prior_precision
from linear_models import laplace_model_of, one_linear_model  # noqa: F401


# -- a single LoRA linear layer as a BayesianLoRAModel ------------------------------------------------


# -- the tiny Llama with A and B sites ------------------------------------------------------------------


@pytest.fixture()
def laplace_model(tiny_llama):
    return laplace_model_of(tiny_llama)


def test_structured_posterior_equals_dense(laplace_model):
    model, data = laplace_model
    fit = fit_laplace(model, data, KFACConfig(n_kfac=3), prior_precision=0.7, progress=False)
    guide = fit.guide
    dense_logdet = 0.0
    sq = 0.0
    for name in model.site_names:
        block = guide.blocks[name]
        P = block.to_matrix(0.7)
        torch.testing.assert_close(block.logdet_precision(0.7), torch.logdet(P), rtol=1e-8, atol=1e-6)
        D = torch.randn(block.shape, dtype=torch.float64)
        torch.testing.assert_close(block.quad_precision(D, 0.7), D.flatten() @ P @ D.flatten(), rtol=1e-8, atol=1e-8)
        dense_logdet += torch.logdet(P)
        sq += block.mean.double().pow(2).sum()
        P_total = sum(b.numel for b in guide.blocks.values())
    lml = fit.factors.log_likelihood - 0.35 * sq + 0.5 * P_total * math.log(0.7) - 0.5 * dense_logdet
    torch.testing.assert_close(guide.log_marginal_likelihood(fit.factors.log_likelihood), lml, rtol=1e-8, atol=1e-6)


def test_glm_variance_equals_dense_jacobian_algebra(laplace_model):
    model, data = laplace_model
    fit = fit_laplace(model, data, KFACConfig(n_kfac=3), prior_precision=2.0, progress=False)
    guide = fit.guide
    sub = EncodedDataset(data.input_ids[:3], data.attention_mask[:3], data.labels[:3], data.choice_mask[:3])
    mean, cov = glm_logit_moments(guide, sub, torch.tensor([2.0, 5.0]), progress=False)
    names = model.site_names
    cov_dense = torch.block_diag(*[torch.linalg.inv(guide.blocks[n].to_matrix(2.0)) for n in names])
    values = {n: v.clone().requires_grad_(True) for n, v in guide.median().items()}
    for i in range(3):
        batch = sub.batch(torch.tensor([i]))
        logits = model.logits_at(batch, values)[0]
        J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(logits[c], [values[n] for n in names],
                                                                             retain_graph=True)])
                         for c in range(logits.shape[0])]).double()
        # J is float32 on both sides, by two routes (output gradients x inputs, summed over tokens,
        # against autograd through the weights): each agrees with the exact Jacobian to float32's
        # rounding accumulated over ~10^2 terms (~1e-5 relative), whatever the CPU's summation order
        torch.testing.assert_close(cov[0, i], J @ cov_dense @ J.T, rtol=1e-4, atol=1e-4 * float(cov[0, i].abs().max()))
        torch.testing.assert_close(mean[i], logits.detach().double())
    assert (torch.diagonal(cov[1], dim1=-2, dim2=-1) <= torch.diagonal(cov[0], dim1=-2, dim2=-1) + 1e-12).all()


def test_relative_glm_covariances_give_the_same_predictives(laplace_model):
    """The covariances of the logits' differences from each batch's first class (one backward
    fewer) equal the full ones pushed through ``D = I - 1 e_r^T``, and the probit and Monte Carlo
    predictives read them the same."""
    from pyro_llm.evaluation.glm import mc_probs, probit_probs

    model, data = laplace_model
    guide = fit_laplace(model, data, KFACConfig(n_kfac=3), prior_precision=2.0, progress=False).guide
    lams = torch.tensor([2.0, 50.0])
    mean, full = glm_logit_moments(guide, data, lams, batch_size=4, progress=False)
    mean_r, rel = glm_logit_moments(guide, data, lams, batch_size=4, progress=False, relative=True)
    torch.testing.assert_close(mean_r, mean)
    C = mean.shape[1]
    assert data.choice_mask[:, 0].all()  # every question has an "A": the reference class of every batch
    assert (rel[..., 0, :] == 0).all() and (rel[..., :, 0] == 0).all() and rel[..., 1:, 1:].abs().sum() > 0
    D = torch.eye(C, dtype=torch.float64)
    D[:, 0] -= 1  # f -> f - f_0 1
    tol = dict(rtol=1e-5, atol=1e-8 * float(full.abs().max()))
    own = data.choice_mask[:, :, None] & data.choice_mask[:, None, :]  # the classes each question has
    torch.testing.assert_close(rel[:, own], (D @ full @ D.T)[:, own], **tol)
    for c_full, c_rel in zip(full, rel):
        torch.testing.assert_close(probit_probs(mean, c_rel), probit_probs(mean, c_full), rtol=1e-5, atol=1e-7)
        a = mc_probs(mean, c_full, 200, torch.Generator().manual_seed(0))
        b = mc_probs(mean, c_rel, 200, torch.Generator().manual_seed(0))
        assert (a - b).abs().max() < 0.05  # two Cholesky factors, the same distribution of differences


def test_guide_samples_have_the_analytic_covariance():
    gen = torch.Generator().manual_seed(0)
    S = EigenFactor.from_matrix(torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64))
    X = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    A = EigenFactor.from_matrix(X.T @ X, rank=2)  # low rank: the complement has only the prior
    block = KronBlock(torch.randn(2, 6, generator=gen, dtype=torch.float64), S, A)
    n = 200_000
    draws = block.rsample(0.8, torch.Size([n]), generator=gen).reshape(n, -1)
    emp = torch.cov(draws.T)
    analytic = torch.linalg.inv(block.to_matrix(0.8))
    torch.testing.assert_close(draws.mean(0), block.mean.flatten(), atol=4 * analytic.diag().max().sqrt() / n ** 0.5,
                               rtol=0)
    assert (emp - analytic).abs().max() < 0.03 * analytic.abs().max()
    value = draws[0].reshape(2, 6)
    dense_lp = torch.distributions.MultivariateNormal(block.mean.flatten(), precision_matrix=block.to_matrix(0.8))
    torch.testing.assert_close(block.log_prob(value, 0.8), dense_lp.log_prob(value.flatten()), rtol=1e-8, atol=1e-8)


def test_marginal_likelihood_is_maximised(laplace_model):
    model, data = laplace_model
    fit = fit_laplace(model, data, KFACConfig(n_kfac=3), progress=False)
    lam = float(fit.guide.prior_precision)
    ll = fit.factors.log_likelihood
    best = fit.guide.log_marginal_likelihood(ll, torch.tensor(lam))
    for f in (0.5, 2.0):
        assert best > fit.guide.log_marginal_likelihood(ll, torch.tensor(lam * f))
    per_site = optimize_prior_precision(fit.guide, "marglik", log_likelihood=ll, layerwise=True)
    assert per_site.shape == (len(model.sites),)
    assert fit.guide.log_marginal_likelihood(ll) >= best - 1e-6


def test_guide_works_with_pyro_predictive_and_saves(laplace_model, tmp_path):
    from pyro_llm.evaluation import predict_proba

    model, data = laplace_model
    guide = fit_laplace(model, data, KFACConfig(n_kfac=3), progress=False).guide
    batch = data.batch(torch.arange(4))
    batch.pop("labels")
    out = pyro.infer.Predictive(model, guide=guide, num_samples=2, return_sites=["logits"])(**batch)
    assert out["logits"].shape[0] == 2
    probs = predict_proba(model, guide, data, num_samples=3, progress=False)
    assert torch.allclose(probs.sum(1), torch.ones(len(data)), atol=1e-5)
    guide.save(tmp_path / "laplace.safetensors")
    again = LaplaceGuide.load(model, tmp_path / "laplace.safetensors")
    torch.testing.assert_close(again.prior_precision, guide.prior_precision)
    for n in model.site_names:
        torch.testing.assert_close(again.blocks[n].A.eigvecs, guide.blocks[n].A.eigvecs)


def test_guide_saves_a_factor_two_sites_share(laplace_model, tmp_path):
    """q_proj's and v_proj's A share one input factor; when its tensors own their storage (the
    streamed decomposition of SmolLM2's d = 576 factors) safetensors refuses the aliased names
    unless the save stores it once, the second site's names as aliases."""
    from dataclasses import replace

    model, data = laplace_model
    guide = fit_laplace(model, data, KFACConfig(n_kfac=3), progress=False).guide
    q, v = (n for n in model.site_names if n.endswith("layers.0.self_attn.q_proj.lora_A")
            or n.endswith("layers.0.self_attn.v_proj.lora_A"))
    own = EigenFactor(guide.blocks[q].A.eigvals.clone(), guide.blocks[q].A.eigvecs.clone())
    guide.blocks[q] = replace(guide.blocks[q], A=own)
    guide.blocks[v] = replace(guide.blocks[v], A=own)
    guide.save(tmp_path / "laplace.safetensors")
    again = LaplaceGuide.load(model, tmp_path / "laplace.safetensors")
    for n in (q, v):
        torch.testing.assert_close(again.blocks[n].A.eigvecs, own.eigvecs, rtol=0, atol=0)
        torch.testing.assert_close(again.blocks[n].A.eigvals, own.eigvals, rtol=0, atol=0)
    assert own.eigvecs.untyped_storage().nbytes() == own.eigvecs.numel() * own.eigvecs.element_size()
    # stored once, under the first site's names; loaded as one tensor for both sites
    with safe_open(str(tmp_path / "laplace.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert f"{q}/A.eigvecs" in stored and f"{v}/A.eigvecs" not in stored and f"{v}/S.eigvecs" in stored
    assert again.blocks[q].A.eigvecs.data_ptr() == again.blocks[v].A.eigvecs.data_ptr()
    # an alias naming nothing stored is a corrupt file, not a KeyError later
    save_file({"x": torch.zeros(2)}, str(tmp_path / "dangling.safetensors"), metadata={ALIASES_KEY: '{"y": "z"}'})
    with pytest.raises(CorruptFileError, match="dangling"):
        load_tensors(tmp_path / "dangling.safetensors")


def test_probit_and_mc_predictives():
    mean = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(probit_probs(mean, zero), mean.softmax(-1))
    torch.testing.assert_close(mc_probs(mean, zero, 100), mean.softmax(-1), atol=1e-5, rtol=0)
    wide = 25 * torch.eye(3, dtype=torch.float64)[None]
    for p in (probit_probs(mean, wide), mc_probs(mean, wide, 20000, torch.Generator().manual_seed(0))):
        assert p.max() < mean.softmax(-1).max()  # uncertainty flattens the predictive
    assert (probit_probs(mean, wide) - mc_probs(mean, wide, 20000, torch.Generator().manual_seed(0))).abs().max() < 0.1


def test_probit_is_shift_invariant_and_binary_mackay():
    """The exact predictive E[softmax(f)] ignores a common (even random) offset of the logits; so must
    the probit: cloze logits are summed log-likelihoods far below zero. For two classes it is
    MacKay's probit of the difference, sigmoid(d / sqrt(1 + pi/8 Var d)); a masked class (the
    model's -1e9 logit, no variance) takes no mass from the others."""
    from pyro_llm.models.model import MASKED_LOGIT

    gen = torch.Generator().manual_seed(0)
    L = torch.randn(6, 3, 3, generator=gen, dtype=torch.float64) * 2
    cov, mean = L @ L.transpose(-1, -2), torch.randn(6, 3, generator=gen, dtype=torch.float64) * 3
    ones = torch.ones(3, 3, dtype=torch.float64)
    shifted = probit_probs(mean - 80.0, cov + 40.0 * ones)  # f - 80 + e with e ~ N(0, 40), common to all classes
    torch.testing.assert_close(shifted, probit_probs(mean, cov), rtol=1e-12, atol=1e-12)
    exact = mc_probs(mean, cov, 200000, torch.Generator().manual_seed(1))
    assert (probit_probs(mean, cov) - exact).abs().max() < 0.1  # an approximation: 0.06 here at variances up to 26
    two_mean, two_cov = mean[:, :2], cov[:, :2, :2]
    d = two_mean[:, 0] - two_mean[:, 1]
    var_d = two_cov[:, 0, 0] + two_cov[:, 1, 1] - 2 * two_cov[:, 0, 1]
    p0 = torch.sigmoid(d / torch.sqrt(1 + math.pi / 8 * var_d))
    torch.testing.assert_close(probit_probs(two_mean, two_cov)[:, 0], p0, rtol=1e-12, atol=1e-12)
    padded_mean = torch.cat([two_mean, torch.full((6, 1), MASKED_LOGIT, dtype=torch.float64)], 1)
    padded_cov = torch.zeros(6, 3, 3, dtype=torch.float64)
    padded_cov[:, :2, :2] = two_cov
    padded = probit_probs(padded_mean, padded_cov)
    torch.testing.assert_close(padded[:, :2], probit_probs(two_mean, two_cov), rtol=1e-12, atol=1e-12)
    assert (padded[:, 2] == 0).all()


def test_laplace_cli_on_our_map_run_and_on_a_plain_peft_adapter(tiny_llama, tmp_path):
    import json

    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from pyro_llm.cli import cli

    runner = CliRunner()
    common = ["--train-limit", "12", "--test-limit", "8", "--max-length", "64"]
    res = runner.invoke(cli, ["svi-train", "--model", str(tiny_llama), "--guide", "map", "--steps", "3", "--lr", "1e-2",
                              "--out", str(tmp_path / "map"), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for predictive in ("glm", "nn"):
        out = tmp_path / f"la-{predictive}"
        res = runner.invoke(cli, ["laplace", "--adapter", str(tmp_path / "map"), "--out", str(out), "--predictive",
                                  predictive, "--eval-samples", "3", *common], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert "log marginal likelihood" in res.output and "ECE" in res.output
        assert (out / "laplace" / "guide.safetensors").is_file() and (out / "reliability_arc-easy_test.png").is_file()
    res = runner.invoke(cli, ["evaluate", str(tmp_path / "la-glm"), "--task", "arc-challenge", "--limit", "6"],
                        catch_exceptions=False)
    assert res.exit_code == 0 and "arc-challenge/test" in res.output, res.output
    # any peft adapter: made with peft alone, base model named in its config
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp_path / "untrained")
    res = runner.invoke(cli, ["laplace", "--adapter", str(tmp_path / "untrained"), "--out", str(tmp_path / "la-init"),
                              *common])
    assert res.exit_code != 0 and "initialisation" in res.output  # B = 0: nothing was learnt, refused
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # as if trained
    peft.save_pretrained(tmp_path / "plain")
    res = runner.invoke(cli, ["laplace", "--adapter", str(tmp_path / "plain"), "--out", str(tmp_path / "la-plain"),
                              "--prior-precision", "val-nll", *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    fit = json.loads((tmp_path / "la-plain" / "laplace" / "fit.json").read_text())
    assert fit["num_params"] == 2 * 2 * (4 * 32) + 2 * (32 * 4) + 2 * (16 * 4)


def test_a_second_prior_precision_reuses_the_curvature_of_a_finished_run(tiny_llama, tmp_path):
    """``--curvature-from``: the K-FAC posterior of an earlier run of the same adapter is reused (the
    planted factors come back) and only the prior precision is chosen again, as a fresh fit would;
    another adapter or other training data are refused."""
    import json
    import shutil

    from click.testing import CliRunner

    from pyro_llm.cli import cli
    from pyro_llm.io import atomic_save_tensors, load_tensors

    runner = CliRunner()
    common = ["--train-limit", "12", "--test-limit", "8", "--max-length", "64", "--model", str(tiny_llama)]

    def invoke(*args):
        return runner.invoke(cli, [*args, *common])

    for seed in (0, 1):
        assert invoke("svi-train", "--guide", "map", "--steps", "3", "--lr", "1e-2", "--seed", str(seed),
                      "--out", str(tmp_path / f"map{seed}")).exit_code == 0
    assert invoke("laplace", "--adapter", str(tmp_path / "map0"), "--out", str(tmp_path / "marglik")).exit_code == 0
    fresh = invoke("laplace", "--adapter", str(tmp_path / "map0"), "--out", str(tmp_path / "valnll"),
                   "--prior-precision", "val-nll")
    assert fresh.exit_code == 0, fresh.output
    reused = invoke("laplace", "--adapter", str(tmp_path / "map0"), "--out", str(tmp_path / "valnll-reused"),
                    "--prior-precision", "val-nll", "--curvature-from", str(tmp_path / "marglik"))
    assert reused.exit_code == 0, reused.output
    fits = {n: json.loads((tmp_path / n / "laplace" / "fit.json").read_text())
            for n in ("marglik", "valnll", "valnll-reused")}
    assert fits["valnll-reused"]["prior_precision"] == pytest.approx(fits["valnll"]["prior_precision"], rel=1e-6)
    assert fits["valnll-reused"]["prior_precision"] != pytest.approx(fits["marglik"]["prior_precision"], rel=1e-3)
    assert fits["valnll-reused"]["log_likelihood"] == fits["marglik"]["log_likelihood"]
    metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text())["arc-easy/test"] for n in ("valnll", "valnll-reused")}
    assert metrics["valnll-reused"]["nll"] == pytest.approx(metrics["valnll"]["nll"], rel=1e-5, abs=1e-6)
    # planted: every eigenvalue of the source doubled comes back in the run that reuses it
    planted = tmp_path / "planted"
    shutil.copytree(tmp_path / "marglik", planted)
    factors = load_tensors(planted / "laplace" / "guide.safetensors")
    atomic_save_tensors(planted / "laplace" / "guide.safetensors",
                        {k: v * 2 if k.endswith("eigvals") else v for k, v in factors.items()})
    assert invoke("laplace", "--adapter", str(tmp_path / "map0"), "--out", str(tmp_path / "from-planted"),
                  "--prior-precision", "1.0", "--curvature-from", str(planted)).exit_code == 0
    got = load_tensors(tmp_path / "from-planted" / "laplace" / "guide.safetensors")
    eig = [k for k in factors if k.endswith("eigvals")]
    assert eig and all(torch.equal(got[k], factors[k] * 2) for k in eig)
    # another adapter, or other training data, is refused with the reason
    res = invoke("laplace", "--adapter", str(tmp_path / "map1"), "--out", str(tmp_path / "wrong"),
                 "--curvature-from", str(tmp_path / "marglik"))
    assert res.exit_code != 0 and "adapter weights" in res.output and not (tmp_path / "wrong").exists()
    res = runner.invoke(cli, ["laplace", "--adapter", str(tmp_path / "map0"), "--out", str(tmp_path / "wrong"),
                              "--curvature-from", str(tmp_path / "marglik"), "--train-limit", "10", "--test-limit",
                              "8", "--max-length", "64", "--model", str(tiny_llama)])
    assert res.exit_code != 0 and "training data" in res.output
