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
from ..models import LoRAOptions
from ..runs.config import (PRESETS, DataConfig, EvalConfig, GuideConfig, LaplaceConfig,
                           LaplaceRunConfig, ModelConfig, ObjectiveConfig, PriorConfig, SVIConfig, ZeroShotConfig)
from ..runs.registry import PREDICTIVES
from ..runs.compare import COMPARE_METHODS, DEFAULT_METHODS, QUICK
from .options import config_options, config_values, param_name

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


def _another_rank() -> bool:
    """Whether this process is a rank other than 0 of a torchrun job: rank 0 alone reports."""
    return int(os.environ.get("RANK", "0")) > 0


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


def _model_options(fn: Any, recipe: dict[str, Any] | None = None) -> Any:
    """The options that say which task, model and data every command runs on (``recipe``: the
    command's own defaults where they differ from the fields')."""
    recipe = recipe or {}
    fn = click.option("--cache-dir", default=None, help="Model cache (default ~/.cache/pyro-llm or $PYRO_LLM_CACHE).")(fn)
    fn = config_options("data", DataConfig, defaults=recipe.get("data"))(fn)
    fn = config_options("model", ModelConfig, defaults=recipe.get("model"))(fn)
    return config_options("", SVIConfig, only=("task",), defaults={"task": recipe["task"]} if "task" in recipe
                          else None)(fn)


def _run_folder_options(fn: Any) -> Any:
    fn = click.option("--overwrite", is_flag=True, help="Replace the pyro-llm run in --out, once the new one is "
                                                       "complete.")(fn)
    return click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory.")(fn)


def _explicit(ctx: click.Context) -> set[str]:
    return {k for k in ctx.params if ctx.get_parameter_source(k) not in
            (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)}


@cli.command("svi-train", context_settings=CONTEXT)
@_model_options
@_run_folder_options
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="A named recipe (blob: the BLoB reference's; blob-adam: BLoB calibrated within a MAP's "
                   "budget); explicitly given options override it.")
@config_options("", SVIConfig, only=("b_site",))
@config_options("guide", GuideConfig)
@config_options("prior", PriorConfig)
@config_options("lora", LoRAOptions)
@config_options("objective", ObjectiveConfig)
@config_options("optim", OptimConfig)
@config_options("eval", EvalConfig)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.pass_context
def svi_train(ctx: click.Context, **kw: Any) -> None:
    """Fine-tune LoRA by SVI (MAP, AutoNormal, BLoB or your own guide), save the adapter and guide, evaluate."""
    from ..runs import train

    explicit = _explicit(ctx)
    values = config_values(SVIConfig, kw)
    for section, entries in PRESETS.get(kw["preset"] or "", {}).items():
        for name, value in entries.items():
            if param_name(section, name) not in explicit:
                values[section][name] = value
    cfg = SVIConfig.from_dict(values)
    try:
        metrics = train(cfg, kw["out"], overwrite=kw["overwrite"], resume=kw["resume"], cache=kw["cache_dir"])
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; {kw['out']} keeps its last checkpoint: continue with the same "
                                   "command and --resume") from None
    if _another_rank():
        return
    _print_metrics(metrics)
    click.echo(f"run saved to {kw['out']}")


@cli.command("compare", context_settings=CONTEXT)
@lambda fn: _model_options(fn, QUICK)
@click.option("--out", "out", default="runs/compare", show_default=True, type=click.Path(path_type=Path),
              help="Folder of the comparison: one run per method inside it.")
@click.option("--overwrite", is_flag=True, help="Replace the methods' runs in --out instead of reusing finished ones.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help=f"Comma-separated methods to compare, among {','.join(COMPARE_METHODS)} (map+ts and laplace "
                   "need map).")
@config_options("prior", PriorConfig)
@config_options("lora", LoRAOptions)
@config_options("optim", OptimConfig, exclude=("g_lr", "g_optimizer", "split_kl"), defaults=QUICK["optim"])
@config_options("eval", EvalConfig, defaults=QUICK["eval"])
def compare_cmd(**kw: Any) -> None:
    """A plain fine-tune (MAP) beside its Bayesian counterparts (Laplace-LoRA around it; BLoB's guide
    over A, or A and B, with --methods) and temperature scaling, on the same data: the metrics side by
    side and one reliability diagram. Without options: SmolLM2-135M on SST-2, minutes on a laptop's CPU."""
    from ..runs import compare

    cfg = SVIConfig.from_dict(config_values(SVIConfig, kw))
    methods = tuple(m.strip() for m in kw["methods"].split(",") if m.strip())
    result = compare(cfg, kw["out"], methods, overwrite=kw["overwrite"], cache=kw["cache_dir"],
                     log=lambda line: click.echo(line, err=True))
    click.echo(result.table())
    click.echo(f"reliability diagram: {result.diagram}")
    click.echo(f"runs: {', '.join(str(kw['out'] / m) for m in sorted({m.replace('+ts', '') for m in result.metrics}))}")


@cli.command("laplace", context_settings=CONTEXT)
@_model_options
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False),
              help="A pyro-llm MAP run folder or any peft LoRA adapter folder.")
@_run_folder_options
@config_options("laplace", LaplaceConfig)
@config_options("kfac", KFACConfig)
@config_options("eval", EvalConfig, exclude=("flipout",))
@config_options("", LaplaceRunConfig, only=("seed",))
def laplace_cmd(**kw: Any) -> None:
    """Fit a post-hoc Laplace posterior (low-rank K-FAC) to a LoRA adapter, tune its prior, evaluate."""
    from ..runs import laplace

    values = config_values(LaplaceRunConfig, kw)
    values["laplace"] = {**values["laplace"], "adapter": kw["adapter"], "kfac": values.pop("kfac")}
    result = laplace(LaplaceRunConfig.from_dict(values), kw["out"], overwrite=kw["overwrite"], cache=kw["cache_dir"])
    if _another_rank():
        return
    _print_metrics({k: v for k, v in result.items() if isinstance(v, dict)})
    click.echo(f"log marginal likelihood {result['log_marginal_likelihood']:.2f}, "
               f"prior precision {result['prior_precision']}")
    click.echo(f"run saved to {kw['out']}")


@cli.command("zero-shot", context_settings=CONTEXT)
@_model_options
@_run_folder_options
@config_options("eval", EvalConfig, only=("batch_size", "ece_bins"))
def zero_shot_cmd(**kw: Any) -> None:
    """Evaluate the base model without any adapter (the fine-tuning baseline)."""
    from ..runs import zero_shot

    cfg = ZeroShotConfig.from_dict(config_values(ZeroShotConfig, kw))
    _print_metrics(zero_shot(cfg, kw["out"], overwrite=kw["overwrite"], cache=kw["cache_dir"]))


def _print_metrics(metrics: dict[str, Any]) -> None:
    for key, m in metrics.items():
        click.echo(f"{key}: accuracy {m['accuracy']:.2f}%  ECE {m['ece']:.2f}%  NLL {m['nll']:.4f}  "
                   f"Brier {m['brier']:.4f}  (n={m['n']})")


def _validation_or_positive(ctx: click.Context, param: click.Parameter, value: str | None) -> str | float | None:
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
              help="Laplace runs: predictive to use (default: the run's). SVI runs with a Gaussian guide: nn "
                   "(the N-sample average, the default), glm or glm-mc (the guide's linearised predictive).")
@click.option("--temperature", default=None, callback=_validation_or_positive,
              help="Temperature-scale the predictive: 'validation' fits T on the run's validation split, "
                   "a number fixes it.")
@click.option("--prior-precision", "prior_precision", default=None, callback=_validation_or_positive,
              help="SVI runs, --predictive glm or glm-mc: read the guide under the Gaussian prior of this "
                   "precision ('validation': chosen by the validation NLL), its means kept, the KL "
                   "weight it trained with undone (the Bayesian posterior).")
@click.option("--limit", type=int, default=None, help="Seeded subset of the split.")
@click.option("--seed", type=int, default=None, help="Seed of every random draw (default: the run's).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Ensembles: write the metrics to this JSON file.")
@click.option("--device", default=None)
@click.option("--cache-dir", default=None)
def evaluate(run_dirs: tuple[Path, ...], tasks_: tuple[str, ...], split: str, samples: int | None,
             predictive: str | None, temperature: str | float | None, prior_precision: str | float | None,
             limit: int | None, seed: int | None, out: Path | None, device: str | None, cache_dir: str | None) -> None:
    """Evaluate saved runs in and out of distribution. One RUN_DIR: results go to its metrics.json
    under <task>/<split>/evaluate-<options>, beside (never over) the metrics of training. Several:
    their ensemble (predictive probabilities averaged), written to --out if given."""
    from ..runs import evaluate as run_evaluate, evaluate_ensemble

    if len(run_dirs) > 1:
        if predictive is not None or temperature is not None or prior_precision is not None:
            raise click.UsageError("--predictive, --prior-precision and --temperature apply to one run, not to an "
                                   "ensemble")
        for task in tasks_ or (None,):
            m = evaluate_ensemble(run_dirs, task, split=split, samples=samples, limit=limit, device=device,
                                  cache=cache_dir, seed=seed, out=out)
            click.echo(f"ensemble of {len(run_dirs)}, {task or _own_task(run_dirs[0])}/{split}: {m.summary()}")
        return
    if out is not None:
        raise click.UsageError("--out is for ensembles; a single run records its results in its metrics.json")
    for task in tasks_ or (None,):
        m = run_evaluate(run_dirs[0], task, split=split, samples=samples, limit=limit, device=device,
                         cache=cache_dir, predictive=predictive, seed=seed, temperature=temperature,
                         prior_precision=prior_precision)
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
