"""``pyro-llm``: a thin click layer over :mod:`pyro_llm.runs`; every name choice comes from
:mod:`pyro_llm.runs.registry`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..curvature import KFACConfig
from ..infer.svi import OptimConfig
from ..runs.config import PRESETS, LaplaceConfig, RunConfig
from ..runs.registry import ELBOS, GUIDES, KL_SCHEDULES, PREDICTIVES, PRIORS

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


def _fail(err: Exception) -> None:
    raise click.ClickException(f"{type(err).__name__}: {err}")


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="pyro-llm")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """Bayesian LoRA fine-tuning of language models with Pyro (BLoB, Laplace-LoRA)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@cli.command()
def tasks() -> None:
    """List the registered tasks."""
    from ..data import list_tasks

    for t in list_tasks():
        click.echo(f"{t.name:40s} {t.kind:16s} {t.num_classes} classes  {t.description}  [{t.source_note}]")
    click.echo("\nA .jsonl or .csv file also works as --task (schema: pyro_llm.data.sources).")


def _common_model_options(fn: Any) -> Any:
    options = [
        click.option("--task", default="arc-easy", help="Task name (see `pyro-llm tasks`) or a .jsonl/.csv file."),
        click.option("--model", "model_name", default=None,
                     help="Embedded name (smollm2-135m, minilm-l6), local folder or hub id. Default: the task's."),
        click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto."),
        click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]),
                     help="Base-model dtype (LoRA and guide parameters stay float32)."),
        click.option("--max-length", default=256, help="Tokens per example (prompts are left-truncated)."),
        click.option("--train-limit", type=int, default=None, help="Use a seeded subset of the training split."),
        click.option("--test-limit", type=int, default=None, help="Use a seeded subset of the test split."),
        click.option("--cache-dir", default=None, help="Model cache (default ~/.cache/pyro-llm or $PYRO_LLM_CACHE)."),
        click.option("--attn-implementation", default=None, type=click.Choice(["eager", "sdpa"]),
                     help="Attention kernel (default: transformers' choice; eager allows double backward, "
                          "e.g. Pyro's AutoLaplaceApproximation on the CPU)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@cli.command("svi-train", context_settings=CONTEXT)
@_common_model_options
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--guide", default="map", type=click.Choice(list(GUIDES)),
              help="; ".join(f"{k}: {v.help}" for k, v in GUIDES.items()))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="A named recipe; explicitly given options override it.")
@click.option("--steps", default=200)
@click.option("--batch-size", default=4)
@click.option("--lr", default=1e-4, help="AdamW learning rate of means and B.")
@click.option("--g-lr", default=1e-1, help="Learning rate of BLoB's G (the blob preset: 0.01 with its tempered KL).")
@click.option("--g-optimizer", default="sgd", type=click.Choice(["sgd", "adamw"]))
@click.option("--warmup-ratio", default=0.06)
@click.option("--decay", default="linear", type=click.Choice(["linear", "constant"]))
@click.option("--weight-decay", default=0.0, help="AdamW decoupled weight decay (the prior already regularises).")
@click.option("--rank", default=8)
@click.option("--alpha", default=16.0)
@click.option("--targets", default=None, help="Comma-separated LoRA target modules (default: the model's query and value projections).")
@click.option("--prior", default="gaussian", type=click.Choice(list(PRIORS)))
@click.option("--prior-scale", default=0.2, help="Prior std (Gaussian) or scale.")
@click.option("--b-site/--b-param", default=False, help="Make B a sample site too (default: a parameter).")
@click.option("--elbo", default="meanfield", type=click.Choice(list(ELBOS)),
              help="meanfield: analytic KL where available; trace: sampled KL.")
@click.option("--flipout/--no-flipout", default=None,
              help="Flipout on the LoRA products. Default: on for guides with Normal marginals (normal, blob).")
@click.option("--kl-schedule", default="constant", type=click.Choice(list(KL_SCHEDULES)))
@click.option("--kl-weight", default=1.0, help="KL weight (constant) or final weight (linear).")
@click.option("--kl-anneal-steps", default=0)
@click.option("--eval-samples", default=10, help="Weight samples N at evaluation (0: mean weights).")
@click.option("--eval-batch-size", default=8)
@click.option("--max-rows", default=64, help="Bound on rows per forward pass when samples are batched.")
@click.option("--ece-bins", default=15)
@click.option("--seed", default=0)
@click.option("--checkpoint-every", default=50)
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.pass_context
def svi_train(ctx: click.Context, **kw: Any) -> None:
    """Fine-tune LoRA by SVI (MAP, AutoNormal or BLoB), save the adapter and guide, evaluate."""
    from ..runs import train

    explicit = {k for k in kw if ctx.get_parameter_source(k) not in
                (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)}
    preset = PRESETS.get(kw["preset"] or "", {})
    optim_keys = {"steps", "batch_size", "lr", "g_lr", "g_optimizer", "warmup_ratio", "decay", "weight_decay",
                  "seed", "checkpoint_every"}
    optim = {k: kw[k] for k in optim_keys}
    for k, v in preset.get("optim", {}).items():
        if k not in explicit:
            optim[k] = v
    run = dict(task=kw["task"], model=kw["model_name"], guide=kw["guide"], rank=kw["rank"], alpha=kw["alpha"],
               targets=tuple(kw["targets"].split(",")) if kw["targets"] else None, prior=kw["prior"],
               prior_scale=kw["prior_scale"], b_site=kw["b_site"], elbo=kw["elbo"], flipout=kw["flipout"],
               kl_schedule=kw["kl_schedule"], kl_weight=kw["kl_weight"], kl_anneal_steps=kw["kl_anneal_steps"],
               eval_samples=kw["eval_samples"], eval_batch_size=kw["eval_batch_size"], max_rows=kw["max_rows"],
               train_limit=kw["train_limit"], test_limit=kw["test_limit"], max_length=kw["max_length"],
               ece_bins=kw["ece_bins"], device=kw["device"], dtype=kw["dtype"],
               attn_implementation=kw["attn_implementation"])
    for k, v in preset.items():
        if k != "optim" and k not in explicit:
            run[k] = v
    try:
        cfg = RunConfig(**run, optim=OptimConfig(**optim))
        metrics = train(cfg, kw["out"], overwrite=kw["overwrite"], resume=kw["resume"], cache=kw["cache_dir"])
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; the last checkpoint in {kw['out']} is intact: "
                                   "continue with the same command and --resume") from None
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as err:
        _fail(err)
    _print_metrics(metrics)
    click.echo(f"run saved to {kw['out']}")


@cli.command("laplace", context_settings=CONTEXT)
@_common_model_options
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False),
              help="A pyro-llm MAP run folder or any peft LoRA adapter folder.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--fisher", default="mc", type=click.Choice(["mc", "empirical"]),
              help="mc: labels sampled from the model (the Fisher); empirical: true labels.")
@click.option("--kfac-mode", default="reduce", type=click.Choice(["reduce", "expand"]),
              help="Treatment of sequence positions (Eschenhagen et al. 2023).")
@click.option("--n-kfac", default=10, help="Rank kept of the large K-FAC factor of each LoRA matrix.")
@click.option("--dense-threshold", default=4096, help="Factors larger than this are streamed at low rank.")
@click.option("--a-only", is_flag=True, help="Posterior over A only (default: A and B, as the paper).")
@click.option("--prior-precision", default="marglik",
              help="marglik, marglik-layerwise, val-nll, prior (1/sigma^2 of the model's Gaussian prior), "
                   "or a fixed positive number.")
@click.option("--predictive", default="glm", type=click.Choice(list(PREDICTIVES)),
              help="; ".join(f"{k}: {v}" for k, v in PREDICTIVES.items()))
@click.option("--mc-samples", default=1000, help="Logit samples of the glm-mc predictive.")
@click.option("--eval-samples", default=10, help="Weight samples of the nn predictive.")
@click.option("--batch-size", default=4)
@click.option("--ece-bins", default=15)
@click.option("--seed", default=0)
@click.option("--overwrite", is_flag=True)
def laplace_cmd(**kw: Any) -> None:
    """Fit a post-hoc Laplace posterior (low-rank K-FAC) to a LoRA adapter, tune its prior, evaluate."""
    from ..runs import laplace

    try:
        kfac = KFACConfig(fisher=kw["fisher"], mode=kw["kfac_mode"], n_kfac=kw["n_kfac"],
                          dense_threshold=kw["dense_threshold"], batch_size=kw["batch_size"])
        lcfg = LaplaceConfig(adapter=kw["adapter"], kfac=kfac, a_only=kw["a_only"],
                             prior_precision=kw["prior_precision"], predictive=kw["predictive"],
                             mc_samples=kw["mc_samples"])
        cfg = RunConfig(task=kw["task"], model=kw["model_name"], train_limit=kw["train_limit"],
                        test_limit=kw["test_limit"], max_length=kw["max_length"], device=kw["device"],
                        dtype=kw["dtype"], eval_samples=kw["eval_samples"], ece_bins=kw["ece_bins"],
                        attn_implementation=kw["attn_implementation"], optim=OptimConfig(seed=kw["seed"]))
        result = laplace(cfg, lcfg, kw["out"], overwrite=kw["overwrite"], cache=kw["cache_dir"])
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as err:
        _fail(err)
    _print_metrics({k: v for k, v in result.items() if isinstance(v, dict)})
    click.echo(f"log marginal likelihood {result['log_marginal_likelihood']:.2f}, "
               f"prior precision {result['prior_precision']}")
    click.echo(f"run saved to {kw['out']}")


@cli.command("zero-shot", context_settings=CONTEXT)
@_common_model_options
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--overwrite", is_flag=True)
def zero_shot_cmd(**kw: Any) -> None:
    """Evaluate the base model without any adapter (the fine-tuning baseline)."""
    from ..runs import zero_shot

    try:
        cfg = RunConfig(task=kw["task"], model=kw["model_name"], test_limit=kw["test_limit"],
                        max_length=kw["max_length"], device=kw["device"], dtype=kw["dtype"],
                        attn_implementation=kw["attn_implementation"])
        _print_metrics(zero_shot(cfg, kw["out"], overwrite=kw["overwrite"], cache=kw["cache_dir"]))
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as err:
        _fail(err)


def _print_metrics(metrics: dict[str, Any]) -> None:
    for key, m in metrics.items():
        click.echo(f"{key}: accuracy {m['accuracy']:.2f}%  ECE {m['ece']:.2f}%  NLL {m['nll']:.4f}  "
                   f"Brier {m['brier']:.4f}  (n={m['n']})")


@cli.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--task", "tasks_", multiple=True, help="Task(s) to evaluate on (default: the run's own). "
              "Repeat for out-of-distribution tasks.")
@click.option("--split", default="test", type=click.Choice(["train", "validation", "test"]))
@click.option("--samples", type=int, default=None, help="Weight samples N (default: the run's; 0: mean).")
@click.option("--predictive", default=None, type=click.Choice(list(PREDICTIVES)),
              help="Laplace runs: predictive to use (default: the run's).")
@click.option("--limit", type=int, default=None, help="Seeded subset of the split.")
@click.option("--device", default=None)
@click.option("--cache-dir", default=None)
def evaluate(run_dir: Path, tasks_: tuple[str, ...], split: str, samples: int | None, predictive: str | None,
             limit: int | None, device: str | None, cache_dir: str | None) -> None:
    """Evaluate a saved run in and out of distribution; metrics go to RUN_DIR/metrics.json."""
    from ..runs import evaluate as run_evaluate

    try:
        for task in tasks_ or (None,):
            kwargs = {"predictive": predictive} if predictive else {}
            m = run_evaluate(run_dir, task, split=split, samples=samples, limit=limit, device=device,
                             cache=cache_dir, **kwargs)
            click.echo(f"{task or 'own task'}/{split}: {m.summary()}")
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        _fail(err)


def main() -> None:  # pragma: no cover
    cli(prog_name="pyro-llm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
