"""``pyro-llm``: a thin click layer over :mod:`pyro_llm.runs`; every name choice comes from
:mod:`pyro_llm.runs.registry`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..curvature import KFACConfig
from ..infer.svi import OptimConfig
from ..runs.config import PRESETS, DataConfig, EvalConfig, LaplaceConfig, ModelConfig, RunConfig
from ..runs.registry import ELBOS, GUIDES, KL_SCHEDULES, PREDICTIVES, PRIORS

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
_RUN, _LAPLACE, _KFAC = RunConfig(), LaplaceConfig(), KFACConfig()  # the defaults the options show


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text[:600]}{'...' if len(text) > 600 else ''}"


class _Commands(click.Group):
    """Errors print as one line naming the problem; ``pyro-llm --debug ...`` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:  # output piped into `head`
            sys.stderr.close()
            raise click.exceptions.Exit(0) from None
        except Exception as err:  # noqa: BLE001 - the CLI's boundary: every error becomes one line
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(f"{_one_line(err)}  (pyro-llm --debug ... shows the traceback)") from None


@click.group(cls=_Commands, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="pyro-llm")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def cli(verbose: bool, debug: bool) -> None:
    """Bayesian LoRA fine-tuning of language models with Pyro (BLoB, Laplace-LoRA)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@cli.command()
def tasks() -> None:
    """List the registered tasks."""
    from ..data import list_tasks

    for t in list_tasks():
        click.echo(f"{t.name:40s} {t.kind:16s} {t.num_classes} classes  {t.description}  [{t.source_note}]")
    click.echo("\nA .jsonl or .csv file also works as --task (schema: pyro_llm.data.sources).")


def _fractions(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"must be three comma-separated numbers, got {value!r}") from None


def _common_model_options(fn: Any) -> Any:
    m, d = _RUN.model, _RUN.data
    options = [
        click.option("--task", default=_RUN.task, help="Task name (see `pyro-llm tasks`) or a .jsonl/.csv file."),
        click.option("--model", "model_name", default=m.name,
                     help="Embedded name (smollm2-135m, minilm-l6), local folder or hub id. Default: the task's."),
        click.option("--device", default=m.device, help="cpu, cuda, cuda:N, or auto."),
        click.option("--dtype", default=m.dtype, type=click.Choice(["float32", "bfloat16"]),
                     help="Base-model dtype (LoRA and guide parameters stay float32)."),
        click.option("--max-length", default=d.max_length, help="Tokens per example (prompts are left-truncated)."),
        click.option("--train-limit", type=int, default=d.train_limit, help="Use a seeded subset of the training split."),
        click.option("--test-limit", type=int, default=d.test_limit, help="Use a seeded subset of the test split."),
        click.option("--split-fractions", default=None, callback=_fractions,
                     help="Train,validation,test fractions of a task that ships one pool (default 0.6,0.1,0.3), "
                          "e.g. 0.3,0.1,0.6 for a large test set."),
        click.option("--cache-dir", default=None, help="Model cache (default ~/.cache/pyro-llm or $PYRO_LLM_CACHE)."),
        click.option("--attn-implementation", default=m.attn_implementation, type=click.Choice(["eager", "sdpa"]),
                     help="Attention kernel (default: transformers' choice; eager allows double backward, "
                          "e.g. Pyro's AutoLaplaceApproximation on the CPU)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


#: Where each option of ``svi-train`` goes in the nested :class:`RunConfig`.
_SVI_PATHS: dict[str, tuple[str, ...]] = {
    "task": ("task",), "model_name": ("model", "name"), "device": ("model", "device"), "dtype": ("model", "dtype"),
    "attn_implementation": ("model", "attn_implementation"), "b_site": ("model", "b_site"),
    "max_length": ("data", "max_length"), "train_limit": ("data", "train_limit"), "test_limit": ("data", "test_limit"),
    "split_fractions": ("data", "split_fractions"),
    "rank": ("lora", "rank"), "alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "targets": ("lora", "target_modules"), "class_head": ("lora", "class_head"),
    "blob_gamma": ("objective", "blob_gamma"), "kl_cycles": ("objective", "kl_cycles"),
    "eval_flipout": ("eval", "flipout"), "prior": ("prior", "name"), "prior_scale": ("prior", "scale"),
    "guide": ("guide", "name"), "flipout": ("guide", "flipout"), "elbo": ("objective", "elbo"),
    "kl_schedule": ("objective", "kl_schedule"), "kl_weight": ("objective", "kl_weight"),
    "kl_anneal_steps": ("objective", "kl_anneal_steps"), "eval_samples": ("eval", "samples"),
    "eval_batch_size": ("eval", "batch_size"), "max_rows": ("eval", "max_rows"), "ece_bins": ("eval", "ece_bins"),
    **{k: ("optim", k) for k in ("steps", "batch_size", "lr", "g_lr", "g_optimizer", "warmup_ratio", "decay",
                                 "weight_decay", "seed", "checkpoint_every", "split_kl")}}


def _nested(values: dict[str, Any], paths: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, path in paths.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = values[key]
    return out


o, g, ob, e = _RUN.optim, _RUN.guide, _RUN.objective, _RUN.eval


@cli.command("svi-train", context_settings=CONTEXT)
@_common_model_options
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--guide", default=g.name, type=click.Choice(list(GUIDES)),
              help="; ".join(f"{k}: {v.help}" for k, v in GUIDES.items()))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="A named recipe; explicitly given options override it.")
@click.option("--steps", default=o.steps)
@click.option("--batch-size", default=o.batch_size)
@click.option("--lr", default=o.lr, help="AdamW learning rate of means and B.")
@click.option("--g-lr", default=o.g_lr, help="Learning rate of the guide's scales (BLoB's G; the blob preset: 0.01 "
                                              "with its tempered KL).")
@click.option("--g-optimizer", default=o.g_optimizer, type=click.Choice(["sgd", "adamw"]))
@click.option("--warmup-ratio", default=o.warmup_ratio, help="Fraction of the steps spent warming up (0 to 1).")
@click.option("--decay", default=o.decay, type=click.Choice(["linear", "constant"]))
@click.option("--weight-decay", default=o.weight_decay, help="AdamW decoupled weight decay (the prior already regularises).")
@click.option("--rank", default=_RUN.lora.rank)
@click.option("--alpha", default=_RUN.lora.alpha)
@click.option("--lora-dropout", default=_RUN.lora.dropout, help="Dropout on the LoRA input (with --guide map: MC dropout "
                                                                 "at evaluation).")
@click.option("--targets", default=None, help="Comma-separated LoRA target modules (default: the model's query and "
                                              "value projections).")
@click.option("--class-head/--no-class-head", default=_RUN.lora.class_head,
              help="LoRA on the output layer too (lm_head; the BLoB reference's --apply-classhead-lora).")
@click.option("--prior", default=_RUN.prior.name, type=click.Choice(list(PRIORS)))
@click.option("--prior-scale", default=_RUN.prior.scale, help="Prior std (Gaussian) or scale.")
@click.option("--b-site/--b-param", default=_RUN.model.b_site, help="Make B a sample site too (default: a parameter).")
@click.option("--elbo", default=ob.elbo, type=click.Choice(list(ELBOS)),
              help="meanfield: analytic KL where available; trace: sampled KL.")
@click.option("--flipout/--no-flipout", default=None,
              help="Flipout on the LoRA products. Default: on for guides with Normal marginals (normal, blob).")
@click.option("--kl-schedule", default=ob.kl_schedule, type=click.Choice(list(KL_SCHEDULES)))
@click.option("--kl-weight", default=ob.kl_weight, help="KL weight (constant) or final weight (linear).")
@click.option("--kl-anneal-steps", default=ob.kl_anneal_steps)
@click.option("--blob-gamma", default=ob.blob_gamma,
              help="KL schedule blob: cycle length M = int(100 N^(pi/gamma) / batch) (the reference's rescaling).")
@click.option("--kl-cycles", default=ob.kl_cycles, help="KL schedule blob-cycles: cycles completed within --steps.")
@click.option("--split-kl/--no-split-kl", default=o.split_kl,
              help="The BLoB reference's update: AdamW on the likelihood's gradient, then SGD at --g-lr on the "
                   "KL's gradient for every parameter.")
@click.option("--eval-samples", default=e.samples, help="Weight samples N at evaluation (0: mean weights).")
@click.option("--eval-flipout/--no-eval-flipout", default=e.flipout,
              help="Flipout on in the N evaluation passes (the BLoB reference's evaluation).")
@click.option("--eval-batch-size", default=e.batch_size)
@click.option("--max-rows", default=e.max_rows, help="Bound on rows per forward pass when samples are batched.")
@click.option("--ece-bins", default=e.ece_bins)
@click.option("--seed", default=o.seed)
@click.option("--checkpoint-every", default=o.checkpoint_every)
@click.option("--overwrite", is_flag=True, help="Replace the pyro-llm run in --out, once the new one is complete.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.pass_context
def svi_train(ctx: click.Context, **kw: Any) -> None:
    """Fine-tune LoRA by SVI (MAP, AutoNormal or BLoB), save the adapter and guide, evaluate."""
    from ..runs import train

    explicit = {k for k in kw if ctx.get_parameter_source(k) not in
                (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)}
    kw["targets"] = tuple(t for t in kw["targets"].split(",")) if kw["targets"] else None
    values = _nested(kw, _SVI_PATHS)
    by_path = {path: key for key, path in _SVI_PATHS.items()}
    for section, entries in PRESETS.get(kw["preset"] or "", {}).items():
        for name, value in entries.items():
            if by_path.get((section, name)) not in explicit:
                values[section][name] = value
    cfg = RunConfig.from_dict(values)
    try:
        metrics = train(cfg, kw["out"], overwrite=kw["overwrite"], resume=kw["resume"], cache=kw["cache_dir"])
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; {kw['out']} keeps its last checkpoint: continue with the same "
                                   "command and --resume") from None
    if int(os.environ.get("RANK", "0")) > 0:  # another rank of a torchrun job: rank 0 reports
        return
    _print_metrics(metrics)
    click.echo(f"run saved to {kw['out']}")


@cli.command("laplace", context_settings=CONTEXT)
@_common_model_options
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False),
              help="A pyro-llm MAP run folder or any peft LoRA adapter folder.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--fisher", default=_KFAC.fisher, type=click.Choice(["mc", "empirical"]),
              help="mc: labels sampled from the model (the Fisher); empirical: true labels.")
@click.option("--kfac-mode", default=_KFAC.mode, type=click.Choice(["reduce", "expand"]),
              help="Treatment of sequence positions (Eschenhagen et al. 2023).")
@click.option("--n-kfac", default=_KFAC.n_kfac, help="Rank kept of the large K-FAC factor of each LoRA matrix.")
@click.option("--dense-threshold", default=_KFAC.dense_threshold,
              help="Factors larger than this are streamed at low rank.")
@click.option("--a-only", is_flag=True, help="Posterior over A only (default: A and B, as the paper).")
@click.option("--curvature-from", default="", type=click.Path(file_okay=False),
              help="A Laplace run of the same adapter and data whose K-FAC is reused; only the prior "
                   "precision is chosen again.")
@click.option("--prior-precision", default=_LAPLACE.prior_precision,
              help="marglik, marglik-layerwise, val-nll, prior (1/sigma^2 of the model's Gaussian prior), "
                   "or a fixed positive number.")
@click.option("--predictive", default=_LAPLACE.predictive, type=click.Choice(list(PREDICTIVES)),
              help="; ".join(f"{k}: {v}" for k, v in PREDICTIVES.items()))
@click.option("--mc-samples", default=_LAPLACE.mc_samples, help="Logit samples of the glm-mc predictive.")
@click.option("--glm-max-tokens", default=_LAPLACE.glm_max_tokens,
              help="Bound on the padded tokens of one batch of a GLM pass (every choice of a cloze question "
                   "counted); its memory grows with them.")
@click.option("--eval-samples", default=e.samples, help="Weight samples of the nn predictive.")
@click.option("--batch-size", default=_KFAC.batch_size)
@click.option("--ece-bins", default=e.ece_bins)
@click.option("--seed", default=o.seed)
@click.option("--overwrite", is_flag=True, help="Replace the pyro-llm run in --out, once the new one is complete.")
def laplace_cmd(**kw: Any) -> None:
    """Fit a post-hoc Laplace posterior (low-rank K-FAC) to a LoRA adapter, tune its prior, evaluate."""
    from ..runs import laplace

    kfac = KFACConfig(fisher=kw["fisher"], mode=kw["kfac_mode"], n_kfac=kw["n_kfac"],
                      dense_threshold=kw["dense_threshold"], batch_size=kw["batch_size"])
    lcfg = LaplaceConfig(adapter=kw["adapter"], kfac=kfac, a_only=kw["a_only"], prior_precision=kw["prior_precision"],
                         predictive=kw["predictive"], mc_samples=kw["mc_samples"], curvature_from=kw["curvature_from"],
                         glm_max_tokens=kw["glm_max_tokens"])
    cfg = RunConfig(task=kw["task"], model=_model_section(kw),
                    data=_data_section(kw),
                    eval=EvalConfig(samples=kw["eval_samples"], ece_bins=kw["ece_bins"]),
                    optim=OptimConfig(seed=kw["seed"]))
    result = laplace(cfg, lcfg, kw["out"], overwrite=kw["overwrite"], cache=kw["cache_dir"])
    _print_metrics({k: v for k, v in result.items() if isinstance(v, dict)})
    click.echo(f"log marginal likelihood {result['log_marginal_likelihood']:.2f}, "
               f"prior precision {result['prior_precision']}")
    click.echo(f"run saved to {kw['out']}")


def _data_section(kw: dict[str, Any]) -> DataConfig:
    return DataConfig(train_limit=kw["train_limit"], test_limit=kw["test_limit"], max_length=kw["max_length"],
                      split_fractions=kw["split_fractions"])


def _model_section(kw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(name=kw["model_name"], device=kw["device"], dtype=kw["dtype"],
                       attn_implementation=kw["attn_implementation"])


@cli.command("zero-shot", context_settings=CONTEXT)
@_common_model_options
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--overwrite", is_flag=True, help="Replace the pyro-llm run in --out, once the new one is complete.")
def zero_shot_cmd(**kw: Any) -> None:
    """Evaluate the base model without any adapter (the fine-tuning baseline)."""
    from ..runs import zero_shot

    cfg = RunConfig(task=kw["task"], model=_model_section(kw),
                    data=_data_section(kw))
    _print_metrics(zero_shot(cfg, kw["out"], overwrite=kw["overwrite"], cache=kw["cache_dir"]))


def _print_metrics(metrics: dict[str, Any]) -> None:
    for key, m in metrics.items():
        click.echo(f"{key}: accuracy {m['accuracy']:.2f}%  ECE {m['ece']:.2f}%  NLL {m['nll']:.4f}  "
                   f"Brier {m['brier']:.4f}  (n={m['n']})")


def _temperature_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | float | None:
    if value is None or value == "validation":
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise click.BadParameter(f"must be 'validation' or a positive number, got {value!r}")
    return number


@cli.command(context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--task", "tasks_", multiple=True, help="Task(s) to evaluate on (default: the run's own). "
              "Repeat for out-of-distribution tasks.")
@click.option("--split", default="test", type=click.Choice(["train", "validation", "test"]))
@click.option("--samples", type=int, default=None, help="Weight samples N (default: the run's; 0: mean).")
@click.option("--predictive", default=None, type=click.Choice(list(PREDICTIVES)),
              help="Laplace runs: predictive to use (default: the run's).")
@click.option("--temperature", default=None, callback=_temperature_option,
              help="Temperature-scale the predictive: 'validation' fits T on the run's validation split, "
                   "a number fixes it.")
@click.option("--limit", type=int, default=None, help="Seeded subset of the split.")
@click.option("--seed", type=int, default=None, help="Seed of every random draw (default: the run's).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Ensembles: write the metrics to this JSON file.")
@click.option("--device", default=None)
@click.option("--cache-dir", default=None)
def evaluate(run_dirs: tuple[Path, ...], tasks_: tuple[str, ...], split: str, samples: int | None,
             predictive: str | None, temperature: str | float | None, limit: int | None, seed: int | None,
             out: Path | None, device: str | None, cache_dir: str | None) -> None:
    """Evaluate saved runs in and out of distribution. One RUN_DIR: results go to its metrics.json
    under <task>/<split>/evaluate-<options>, beside (never over) the metrics of training. Several:
    their ensemble (predictive probabilities averaged), written to --out if given."""
    from ..runs import evaluate as run_evaluate, evaluate_ensemble

    if len(run_dirs) > 1:
        if predictive is not None or temperature is not None:
            raise click.UsageError("--predictive and --temperature apply to one run, not to an ensemble")
        for task in tasks_ or (None,):
            m = evaluate_ensemble(run_dirs, task, split=split, samples=samples, limit=limit, device=device,
                                  cache=cache_dir, seed=seed, out=out)
            click.echo(f"ensemble of {len(run_dirs)}, {task or _own_task(run_dirs[0])}/{split}: {m.summary()}")
        return
    if out is not None:
        raise click.UsageError("--out is for ensembles; a single run records its results in its metrics.json")
    for task in tasks_ or (None,):
        m = run_evaluate(run_dirs[0], task, split=split, samples=samples, limit=limit, device=device,
                         cache=cache_dir, predictive=predictive, seed=seed, temperature=temperature)
        click.echo(f"{task or _own_task(run_dirs[0])}/{split}: {m.summary()}")


def _own_task(run_dir: Path) -> str:
    """The task a run was trained on, by its registered name (a task file: the file's name)."""
    from ..data import get_task
    from ..runs import run_config_of

    return get_task(run_config_of(run_dir).task).name


def main() -> None:  # pragma: no cover
    cli(prog_name="pyro-llm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
