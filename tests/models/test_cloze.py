"""Cloze multiple choice: each choice's log-likelihood after the context is its class logit.

The head is checked against each choice scored alone by the plain transformers model (no padding,
no batching, full vocabulary logits); the encoding against the tokenizer; K-FAC on the
``[examples, choices, length]`` batches against factors gathered by hand from the layer inputs."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from pyro_llm.cli import cli
from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.data import CLOZE, Example, encode_examples, get_task, load_examples
from pyro_llm.models import ChoiceLikelihoodHead, build_model


def _scored_alone(lm, tok, context: str, choice: str) -> float:
    ctx = tok(context)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = lm(torch.tensor([ctx + cont])).logits.double().log_softmax(-1)[0]
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_each_choice_logit_is_its_log_likelihood_scored_alone(tiny_llama):
    task = get_task("arc-easy-cloze")
    assert task.kind == CLOZE
    examples = load_examples(task, "test", limit=6)
    model, tok = build_model(str(tiny_llama), task)
    assert isinstance(model.head, ChoiceLikelihoodHead)
    model.head.chunk = 5  # vocabulary logits formed a few positions at a time, as on long batches
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the LoRA path counts
        for s in model.sites:
            s.layer.lora_B[model.adapter].weight.normal_(0, 0.2)
    data = encode_examples(examples, tok, task.num_classes, max_length=512)
    assert data.input_ids.dim() == 3 and data.input_ids.shape[1] == task.num_classes
    with torch.no_grad():
        logits = model.logits_at(data.batch(torch.arange(len(data))))
    assert logits.shape == (6, task.num_classes)
    for i, ex in enumerate(examples):
        expected = torch.tensor([_scored_alone(model.peft_model, tok, ex.text, c) for c in ex.choices],
                                dtype=torch.float64)
        torch.testing.assert_close(logits[i, :ex.num_choices].double(), expected, rtol=1e-4, atol=1e-4)
        assert (logits[i, ex.num_choices:] < -1e8).all()  # absent choices are masked, not scored
    # the LoRA weights do enter: the plain base model scores differently
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain = _scored_alone(base, tok, examples[0].text, examples[0].choices[0])
    assert abs(plain - float(logits[0, 0])) > 1e-3


def _arc_and_one_word_contexts(tok, task, max_length):
    words = [w.lstrip("Ġ") for w in list(tok.get_vocab())[200:260]]
    one_word = [Example(words[i], 1, 2, choices=(" " + words[i + 1], " " + words[i + 2] + " x"))
                for i in (0, 3)]  # nothing to share: the position before the first choice token is the context
    examples = load_examples(task, "test", limit=6) + one_word
    return encode_examples(examples, tok, task.num_classes, max_length=max_length)


@pytest.mark.parametrize("max_length, saves", [(512, True), (40, False)])
def test_choices_share_their_context_pass_at_prediction_and_score_as_whole_rows(tiny_llama, max_length, saves):
    """Under no_grad the context is encoded once per question (a KV cache repeated for its choices);
    the logits must equal the whole rows' (the path under a gradient), for S stacked weight samples,
    absent choices (ARC has 3 to 5), one-word contexts that share nothing, and contexts cut from the
    left (at max_length 40 a question's choices share nothing, and whole rows are no more tokens)."""
    task = get_task("arc-easy-cloze")
    model, tok = build_model(str(tiny_llama), task)
    torch.manual_seed(0)
    with torch.no_grad():
        for s in model.sites:
            s.layer.lora_B[model.adapter].weight.normal_(0, 0.2)
    data = _arc_and_one_word_contexts(tok, task, max_length)
    assert not data.choice_mask.all()  # absent choices are in the batch
    samples = 3
    batch = {k: v.repeat(samples, *([1] * (v.dim() - 1))) for k, v in data.batch(torch.arange(len(data))).items()
             if k in ("input_ids", "attention_mask", "choice_mask", "token_type_ids")}
    values = {s.name: 0.3 * torch.randn(samples, *s.shape) for s in model.sites}
    tokens: list[int] = []
    hook = model.peft_model.get_input_embeddings().register_forward_hook(lambda m, i, o: tokens.append(i[0].numel()))
    try:
        with torch.no_grad():
            shared = model.logits_at(batch, values)
        shared_tokens, tokens[:] = sum(tokens), []
        with torch.enable_grad():
            whole = model.logits_at(batch, values).detach()
        whole_tokens, tokens[:] = sum(tokens), []
        model.head.share_context = False
        with torch.no_grad():
            model.logits_at(batch, values)
        switched_off_tokens = sum(tokens)
    finally:
        hook.remove()
    torch.testing.assert_close(shared, whole, rtol=1e-4, atol=1e-4)
    assert whole_tokens == batch["input_ids"].numel()
    # the contexts ran once per question, not once per choice; never more tokens than whole rows
    assert shared_tokens < 0.8 * whole_tokens if saves else shared_tokens == whole_tokens
    assert switched_off_tokens == whole_tokens  # switched off, prediction runs whole rows
    # each weight sample scores its own rows: as the same rows run with that sample alone
    single = {k: v[:len(data)] for k, v in batch.items()}
    per_sample = shared.view(samples, len(data), -1)
    real = per_sample[:, data.choice_mask]
    assert (real[0] - real[1]).abs().max() > 0.05  # the samples' scores differ, so the check can fail
    with torch.no_grad():
        for i in range(samples):
            alone = model.logits_at(single, {name: v[i:i + 1] for name, v in values.items()})
            torch.testing.assert_close(alone.view(len(data), -1)[data.choice_mask], real[i], rtol=1e-4, atol=1e-4)


def test_the_context_is_cut_from_the_left_and_the_choice_kept_whole(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    words = list(tok.get_vocab())[10:40]
    context, choices = " ".join(words[:20]), (" " + " ".join(words[20:23]), " " + words[23])
    data = encode_examples([Example(context, 1, 2, choices=choices)], tok, num_classes=3, max_length=8)
    ctx_ids = tok(context)["input_ids"]
    for c, choice in enumerate(choices):
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        n = int(data.attention_mask[0, c].sum())
        row, seg = data.input_ids[0, c, :n].tolist(), data.token_type_ids[0, c, :n].tolist()
        assert n == 8 and row[-len(cont):] == cont and row[:-len(cont)] == ctx_ids[-(8 - len(cont)):]
        assert seg == [0] * (8 - len(cont)) + [1] * len(cont)
    assert data.choice_mask.tolist() == [[True, True, False]] and data.token_type_ids[0, 2].sum() == 0
    with pytest.raises(ValueError, match="cannot be encoded with examples without"):
        encode_examples([Example(context, 0, 2, choices=choices), Example(context, 0, 2)], tok, 3)


def test_kfac_input_factor_of_cloze_batches_leaves_out_padding(tiny_llama):
    task = get_task("arc-easy-cloze")
    model, tok = build_model(str(tiny_llama), task)
    data = encode_examples(load_examples(task, "train", limit=5), tok, task.num_classes, max_length=512)
    assert (data.attention_mask.sum(-1) < data.attention_mask.shape[-1]).any()  # there is padding to leave out
    site = model.sites[0]
    seen: list[torch.Tensor] = []
    handle = site.module.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().double()))
    cfg = KFACConfig(fisher="empirical", mode="reduce", n_kfac=10_000, batch_size=2)
    try:
        factors = fit_kfac(model, data, cfg, progress=False)
    finally:
        handle.remove()
    # by hand: each transformer row (one choice of one example) is the mean of its real positions
    rows = []
    for idx, x in zip(data.by_length(cfg.batch_size), seen):
        mask = data.batch(idx)["attention_mask"].reshape(x.shape[0], -1).double()
        rows.append((mask[:, :, None] * x).sum(1) / mask.sum(1, keepdim=True))
    rows = torch.cat(rows)
    assert rows.shape[0] == len(data) * task.num_classes
    _, A = factors.factors[site.name]
    torch.testing.assert_close(A.to_matrix(), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-7)


def test_cloze_runs_train_fit_laplace_and_evaluate_on_a_shifted_cloze_task(tiny_llama, tmp_path):
    runner = CliRunner()
    common = ["--task", "arc-easy-cloze", "--train-limit", "12", "--test-limit", "8", "--max-length", "96"]
    res = runner.invoke(cli, ["svi-train", "--model", str(tiny_llama), "--guide", "blob", "--steps", "3", "--lr",
                              "1e-2", "--eval-samples", "3", "--out", str(tmp_path / "blob"), *common],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["svi-train", "--model", str(tiny_llama), "--guide", "map", "--steps", "3", "--lr",
                              "1e-2", "--out", str(tmp_path / "map"), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["laplace", "--adapter", str(tmp_path / "map"), "--out", str(tmp_path / "la"), *common],
                        catch_exceptions=False)
    assert res.exit_code == 0 and "arc-easy-cloze/test" in res.output, res.output
    res = runner.invoke(cli, ["evaluate", str(tmp_path / "la"), "--task", "openbookqa-cloze", "--limit", "6"],
                        catch_exceptions=False)
    assert res.exit_code == 0 and "openbookqa-cloze/test" in res.output, res.output
    res = runner.invoke(cli, ["evaluate", str(tmp_path / "blob"), "--task", "arc-easy", "--limit", "6"])
    assert res.exit_code != 0 and "cloze task" in res.output


def test_every_cloze_task_reads_choices_and_labels_consistently():
    from pyro_llm.data import TASKS

    cloze = [t for t in TASKS.values() if t.kind == CLOZE]
    assert {"piqa-cloze", "hellaswag-cloze", "boolq-cloze", "social-iqa-cloze"} <= {t.name for t in cloze}
    for task in cloze:
        examples = load_examples(task, "train", limit=40)
        assert examples, task.name
        for ex in examples:
            assert ex.num_choices == len(ex.choices) <= task.num_classes and 0 <= ex.label < ex.num_choices
            assert all(c.startswith(" ") and c.strip() for c in ex.choices) and ex.text.endswith("Answer:") or \
                task.name == "hellaswag-cloze"
    # the cloze twin reads the same pool as the lettered task: the same share of "yes" answers
    yes = [sum(e.label == 0 for split in ("train", "validation", "test") for e in load_examples(name, split))
           for name in ("boolq", "boolq-cloze")]
    assert yes[0] == yes[1]


def test_glm_batches_stay_within_the_token_bound_and_give_the_same_moments(tiny_llama):
    """The GLM pass holds a batch's forward graph and a gradient per class: ``max_tokens`` cuts a
    cloze batch (every choice a sequence) to its bound, and the moments do not depend on the cut."""
    from pyro_llm.evaluation.glm import glm_logit_moments
    from pyro_llm.guides import LaplaceGuide
    from pyro_llm.infer.laplace import blocks_from_factors

    task = get_task("arc-easy-cloze")
    model, tok = build_model(str(tiny_llama), task)
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.1)
    data = encode_examples(load_examples(task, "train", limit=6), tok, task.num_classes, max_length=96)
    factors = fit_kfac(model, data, KFACConfig(fisher="empirical", n_kfac=8, batch_size=6), progress=False)
    guide = LaplaceGuide(model, blocks_from_factors(model, factors), 1.0)
    bound = 2 * task.num_classes * int(data.attention_mask.sum(-1).max())  # two questions of the longest
    tokens: list[int] = []
    handle = model.sites[0].module.register_forward_hook(lambda m, i, o: tokens.append(i[0].shape[:-1].numel()))
    try:
        bounded = glm_logit_moments(guide, data, batch_size=6, max_tokens=bound, progress=False)
        assert len(tokens) >= 3 and max(tokens) <= bound  # six questions cut into batches of at most two
        tokens.clear()
        whole = glm_logit_moments(guide, data, batch_size=6, max_tokens=None, progress=False)
        assert len(tokens) == 1 and tokens[0] > bound  # unbounded: one batch over the bound
    finally:
        handle.remove()
    # float32 forwards of other batch shapes: equal to float32's rounding
    torch.testing.assert_close(bounded[0], whole[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bounded[1], whole[1], rtol=1e-4, atol=1e-4 * float(whole[1].abs().max()))


def test_glm_of_a_cloze_head_takes_one_backward_and_equals_the_dense_jacobian_algebra(tiny_llama, monkeypatch):
    """A cloze head's rows are its classes: the GLM pass takes every class's Jacobian from one
    backward of the logits' sum (not a backward per class), and its covariances equal ``J Sigma J^T``
    with ``J`` by autograd through the weights, one class at a time, and ``Sigma`` the dense inverse."""
    from pyro_llm.evaluation.glm import glm_logit_moments
    from pyro_llm.guides import LaplaceGuide
    from pyro_llm.infer.laplace import blocks_from_factors

    task = get_task("arc-easy-cloze")
    model, tok = build_model(str(tiny_llama), task)
    assert model.head.rows_are_classes
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.1)
    data = encode_examples(load_examples(task, "train", limit=4), tok, task.num_classes, max_length=96)
    assert not data.choice_mask.all()  # some question has fewer choices: masked classes included
    factors = fit_kfac(model, data, KFACConfig(fisher="empirical", n_kfac=8, batch_size=4), progress=False)
    guide = LaplaceGuide(model, blocks_from_factors(model, factors), 1.0)
    calls: list[bool] = []
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched", False)))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    mean, cov = glm_logit_moments(guide, data, torch.tensor([0.5]), batch_size=2, max_tokens=None, progress=False)
    assert calls == [False, False]  # two batches, one plain backward each
    calls.clear()
    model.head.rows_are_classes = False  # the generic route: a backward per class, batched
    mean_b, cov_b = glm_logit_moments(guide, data, torch.tensor([0.5]), batch_size=2, max_tokens=None,
                                      progress=False)
    assert calls == [True, True]
    monkeypatch.undo()
    torch.testing.assert_close(mean, mean_b)
    torch.testing.assert_close(cov, cov_b, rtol=1e-4, atol=1e-4 * float(cov.abs().max()))

    names = model.site_names
    cov_dense = torch.block_diag(*[torch.linalg.inv(guide.blocks[n].to_matrix(0.5)) for n in names])
    values = {n: v.clone().requires_grad_(True) for n, v in guide.median().items()}
    for i in range(len(data)):
        batch = data.batch(torch.tensor([i]))
        logits = model.logits_at(batch, values)[0]
        classes = torch.nonzero(batch["choice_mask"][0]).flatten().tolist()
        J = torch.stack([torch.cat([g.flatten() for g in grad(logits[c], [values[n] for n in names],
                                                              retain_graph=True)]) for c in classes]).double()
        # float32 Jacobians by two routes (output gradients x inputs against autograd through the
        # weights) agree to float32's rounding accumulated over the tokens
        torch.testing.assert_close(cov[0, i][classes][:, classes], J @ cov_dense @ J.T, rtol=1e-4,
                                   atol=1e-4 * float(cov[0, i].abs().max()))
        assert cov[0, i].diagonal()[classes].min() > 0
