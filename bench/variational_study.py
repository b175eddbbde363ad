"""Which variational guide calibrates, and at what cost in steps: the reference-recipe BLoB at its
own length against guides meant to calibrate within a few hundred steps, all against MAP and
temperature-scaled MAP on the same test examples.

Methods (every one a library feature selected by configuration, nothing written for the study):

* ``map``: Pyro's ``AutoDelta`` with the calibration study's recipe (``bench.study``'s ``cpu-sst2``:
  150 steps of 8, AdamW lr 1e-3); ``map+ts``: its temperature fitted on the validation split.
* ``blob-ref``: ``--preset blob`` (the BLoB reference's recipe, ``pyro_llm.runs.PRESETS``) at its
  own 5000 steps; batch 8 as the testbed (the cycle length M follows the batch).
* ``blob-adam``: BLoB's guide with the MAP's recipe and its ``G`` trained by AdamW (lr 1e-2) under a
  tempered exact ELBO, the KL weight ``w`` chosen per seed on the validation NLL among ``W_GRID``.
* ``blob-adam-ab``: the same over ``A`` and ``B`` (``B`` a site too, as Laplace-LoRA's posterior
  covers both), its ``w`` chosen the same way.
* ``<guide>-glm`` rows: a trained variational guide's linearised predictive (``evaluate --predictive
  glm``: the logits' Gaussian ``N(f(x; M), J diag(sigma^2) J^T)``, probit), the same runs;
  ``<guide>-glm-val``: the same guide read under the Gaussian prior whose precision the validation
  NLL chooses (``--prior-precision validation``, :mod:`pyro_llm.infer.reprior`).
* ``blob-cycles``: BLoB's guide with the MAP's recipe, the reference's ``2^i`` KL reweighting and
  two-optimiser update, its cycles fitted to the planned steps (``--kl-schedule blob-cycles``).
* ``ivon``: :class:`~pyro_llm.guides.IVONGuide` over ``A`` and ``B`` (IVON's LoRA recipe applies it
  to every LoRA matrix) with the MAP's steps and batches, its own optimiser at ``IVON["lr"]``, the
  effective sample size chosen per seed on the validation NLL among ``ESS_GRID`` (multiples of N).
* ``scale-search``: no training beyond the MAP: ``q(A) = N(A_MAP, s^2)`` with ``s`` chosen on the
  validation NLL among ``SCALE_GRID`` (:func:`pyro_llm.infer.search_scale`, training-free).

Runs resume (a finished run is never redone); ``--cells`` picks which methods this process trains
(two processes on a 2-core machine: ``blob-ref`` in one, the rest in the other); ``--tables``
writes the tables from what has finished.

    OMP_NUM_THREADS=1 python -m bench.variational_study --testbed minilm --cells map blob-ref \
        --runs-dir runs/variational-minilm --out docs/results/variational-sst2-minilm &
    OMP_NUM_THREADS=1 python -m bench.variational_study --cells map blob-adam blob-cycles --runs-dir runs/variational &
    python -m bench.variational_study --tables --runs-dir runs/variational --out docs/results/variational-sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from pyro_llm.data import get_task, load_examples
from pyro_llm.evaluation import compute_metrics, predict_proba
from pyro_llm.infer import search_scale
from pyro_llm.io import atomic_write_json
from pyro_llm.runs import (SVIConfig, evaluate, load_run, load_split, preset_config, read_config, record_metrics,
                            train)

from .study import CONFIGS, _differences, _fmt, _log, _scored, run_config

#: SmolLM2-135M as in the calibration study (about 1-2 s a training step on 2 cores: short budgets
#: only), MiniLM-L6 on the same cut (about 0.2 s a step: the reference recipe's 5000 steps fit), and
#: SmolLM2 on PIQA in cloze form (``cpu-piqa``: 1098 / 186 / 554 questions); each with its task and
#: the description its table starts with
TESTBEDS: dict[str, tuple[dict[str, Any], str, str]] = {
    "smollm2": (CONFIGS["cpu-sst2"], "sst2", "SST-2 (the `cpu-sst2` cut: 87 / 262 / 523 sentences)"),
    "minilm": (dict(CONFIGS["cpu-sst2"], model="minilm-l6", lr=2e-3), "sst2",
               "SST-2 (the `cpu-sst2` cut: 87 / 262 / 523 sentences)"),
    "smollm2-piqa": (CONFIGS["cpu-piqa"], "piqa-cloze", "PIQA in cloze form (the `cpu-piqa` cut: 1098 / 186 / 554 "
                                                         "questions)")}
TESTBED, TASK, DESCRIPTION = TESTBEDS["smollm2"]
W_GRID = (1.0, 0.1, 0.01)
#: IVON's effective sample sizes, as multiples of the training set's size N: at N itself (and up to
#: 100 N) on SST-2's 87 sentences ``sigma`` stays at the prior's 0.2 on every entry of ``A`` and ``B``
#: and nothing is learnt in 150 steps (MiniLM pilot, docs); 10^3-10^4 N is IVON's LoRA regime
ESS_GRID = (1e3, 1e4)
#: IVON's recipe for the testbed's budget (its scales set by its Hessian estimate; see the docs): of
#: the rescaled learning rates 0.03, 0.1, 0.3 the MiniLM pilot's 0.03 had the lowest test NLL
IVON = {"lr": 0.03, "hess_init": 1e-3, "beta2": 0.99}
SCALE_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _testbed(seed: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """The testbed's data, model and evaluation settings as nested sections, ``sections`` merged in."""
    base = run_config(TESTBED, TASK, seed).to_dict()
    out = {k: base[k] for k in ("model", "data", "eval")}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


def _variant(seed: int, **sections: Any) -> SVIConfig:
    """The MAP's recipe (guide, optimiser, objective) with ``sections`` changed (a top-level field
    such as ``b_site`` replaced)."""
    cfg = run_config(TESTBED, TASK, seed).to_dict()
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values} if isinstance(values, dict) else values
    return SVIConfig.from_dict(cfg)


def configs(seed: int) -> dict[str, SVIConfig]:
    """Every run of one seed, by run name."""
    out = {"map": run_config(TESTBED, TASK, seed, guide="map"),
           "blob-ref": preset_config("blob", task=TASK, **_testbed(
               seed, optim={"batch_size": TESTBED["batch_size"], "seed": seed, "checkpoint_every": 500})),
           "blob-cycles": _variant(seed, guide={"name": "blob", "flipout": True},
                                   objective={"kl_schedule": "blob-cycles", "kl_cycles": 4},
                                   optim={"split_kl": True})}
    for w in CHOSEN["blob-adam"].grid:  # --preset blob-adam is w = 0.1
        out[f"blob-adam-w{w:g}"] = _variant(seed, guide={"name": "blob", "flipout": True},
                                            objective={"kl_weight": w}, optim={"g_optimizer": "adamw"})
    for w in CHOSEN["blob-adam-ab"].grid:
        out[f"blob-adam-ab-w{w:g}"] = _variant(seed, b_site=True, guide={"name": "blob", "flipout": True},
                                               objective={"kl_weight": w}, optim={"g_optimizer": "adamw"})
    n = _train_size(seed)
    for e in CHOSEN["ivon"].grid:  # IVON over A and B (its LoRA recipe), as the paper applies it to every LoRA matrix
        out[f"ivon-e{e:g}"] = _variant(seed, b_site=True, optim={"lr": IVON["lr"]},
                                       guide={"name": "ivon", "ivon_ess": e * n, "ivon_hess_init": IVON["hess_init"],
                                              "ivon_beta2": IVON["beta2"]})
    return out


def _train_size(seed: int) -> int:
    """The testbed's number of training examples."""
    cfg = run_config(TESTBED, TASK, seed)
    return len(load_examples(get_task(cfg.task), "train", limit=cfg.data.train_limit, split_seed=cfg.data.split_seed,
                             fractions=cfg.data.split_fractions))


#: a chosen guide's rows: its N-sample predictive (""), temperature-scaled ("+ts"), linearised
#: ("-glm"), linearised under the prior precision chosen on validation ("-glm-val"); evaluate's options
ROWS: dict[str, dict[str, Any]] = {"": {}, "+ts": {"temperature": "validation"}, "-glm": {"predictive": "glm"},
                                   "-glm-val": {"predictive": "glm", "prior_precision": "validation"}}


@dataclass(frozen=True)
class Chosen:
    """A guide whose setting is chosen per seed on the validation NLL: its runs' name prefix, the
    grid's label and values (one run each), and its rows, the first one's predictive choosing."""

    prefix: str
    label: str
    grid: tuple[float, ...]
    rows: tuple[str, ...]


#: the A-and-B guide's rows are its linearised predictives only (weight draws of B through the
#: network, N = 10 passes, are what a linearised pass replaces), so it is trained without a sampled
#: test pass; ``--weights``, ``--ab-weights`` and ``--ess`` replace the grids
CHOSEN: dict[str, Chosen] = {
    "blob-adam": Chosen("blob-adam-w", "KL weight", W_GRID, tuple(ROWS)),
    "blob-adam-ab": Chosen("blob-adam-ab-w", "KL weight", W_GRID, ("-glm-val", "-glm")),
    "ivon": Chosen("ivon-e", "effective sample size / N", ESS_GRID, ("", "+ts", "-glm"))}
#: ``--rows`` names -> ROWS keys; the rows the tables score and show (``--rows``; default: all)
ROW_NAMES = {"nn": "", "ts": "+ts", "glm": "-glm", "glm-val": "-glm-val"}
SHOWN_ROWS = set(ROWS)
#: ``--cells`` names -> the run names they train
CELL_RUNS: dict[str, Callable[[str], bool]] = {
    "map": lambda r: r == "map", "blob-ref": lambda r: r == "blob-ref", "blob-cycles": lambda r: r == "blob-cycles",
    **{m: (lambda r, p=c.prefix: r.startswith(p)) for m, c in CHOSEN.items()},
    "scale-search": lambda r: False}


def _scale_search(map_dir: Path) -> None:
    """The training-free scale search around a finished MAP run, recorded in its ``metrics.json``
    under ``<task>/test/scale-search`` (with the scale, each grid point's validation NLL and the
    search's seconds)."""
    key = f"{TASK}/test/scale-search"
    if key in json.loads((map_dir / "metrics.json").read_text()):
        return
    t0 = time.perf_counter()
    run = load_run(map_dir)
    cfg = run.config
    validation = load_split(cfg, run.task, "validation", run.tokenizer, None)
    test = load_split(cfg, run.task, "test", run.tokenizer, cfg.data.test_limit)
    found = search_scale(run.model, validation, SCALE_GRID, num_samples=cfg.eval.samples, seed=cfg.optim.seed,
                         batch_size=cfg.eval.batch_size)
    pyro.set_rng_seed(cfg.optim.seed)
    probs = predict_proba(run.model, found.guide, test, num_samples=cfg.eval.samples,
                          batch_size=cfg.eval.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    record_metrics(map_dir, key, compute_metrics(probs, test.labels), probs, test.labels,
                   extra={"scale": found.scale, "validation_nll": {f"{k:g}": v for k, v in found.validation_nll.items()},
                          "search_seconds": seconds})
    _log(f"{map_dir}: scale search chose {found.scale:g} in {seconds:.0f} s")


def _method(name: str) -> str | None:
    """The chosen method a run belongs to (by its name's prefix), if any."""
    return next((m for m, c in CHOSEN.items() if name.startswith(c.prefix)), None)


def _train(cfg: SVIConfig, run_dir: Path) -> None:
    """Train (or resume) one run; its N-sample test pass only where a row reads it."""
    if _finished(run_dir):
        return
    resume = (run_dir / "config.json").is_file()
    method = _method(run_dir.name)
    t0 = time.perf_counter()
    train(cfg, run_dir, overwrite=not resume, resume=resume, progress=False,
          evaluate_after=method is None or "" in CHOSEN[method].rows)
    (run_dir / "wall_seconds").write_text(f"{time.perf_counter() - t0}\n")
    _log(f"{run_dir}: trained and evaluated in {time.perf_counter() - t0:.0f} s")


def _validation_nll(run_dir: Path) -> float:
    """The run's validation NLL by its method's first row's predictive (the N-sample one, or the
    linearised one for a guide whose rows are linearised), evaluated once and kept in ``validation_nll``."""
    kept = run_dir / "validation_nll"
    if not kept.is_file():
        method = _method(run_dir.name)
        options = ROWS[CHOSEN[method].rows[0]] if method else {}
        kept.write_text(f"{evaluate(run_dir, split='validation', progress=False, **options).nll!r}\n")
    return float(kept.read_text())


def run_cells(cells: list[str], seeds: list[int], root: Path) -> None:
    for seed in seeds:
        if "scale-search" in cells and (root / f"seed{seed}" / "map" / "metrics.json").is_file():
            _scale_search(root / f"seed{seed}" / "map")
        for name, cfg in configs(seed).items():
            if any(CELL_RUNS[c](name) for c in cells):
                _train(cfg, root / f"seed{seed}" / name)
                if _method(name) is not None:
                    _log(f"{name} seed {seed}: validation NLL {_validation_nll(root / f'seed{seed}' / name):.4f}")


def _finished(run_dir: Path) -> bool:
    """Trained to its last step (its test pass, when it had one, recorded in ``metrics.json``)."""
    return (run_dir / "metrics.json").is_file() or (
        (run_dir / "config.json").is_file() and read_config(run_dir).get("state") == "finished")


def _seconds(run_dir: Path) -> float:
    return sum(h["seconds"] for h in json.loads((run_dir / "history.json").read_text()))


def tables(seeds: list[int], root: Path, out: Path, resamples: int, search: bool = True) -> None:
    """Rows of what has finished: metrics over seeds, paired differences, cost in steps and seconds."""
    rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    cost: dict[str, list[tuple[int, float]]] = {}
    chosen: dict[str, dict[int, str]] = {m: {} for m in CHOSEN}
    scales: dict[int, float] = {}
    for seed in seeds:
        base = root / f"seed{seed}"
        done = {name: base / name for name in configs(seed) if _finished(base / name)}
        methods: dict[str, tuple[Path, dict[str, Any]]] = {}
        if "map" in done:
            methods["map"] = (done["map"], {})
            methods["map+ts"] = (done["map"], {"temperature": "validation"})
            if search:
                _scale_search(done["map"])
                methods["scale-search"] = (done["map"], {})
        for name in ("blob-ref", "blob-cycles"):
            if name in done:
                methods[name] = (done[name], {})
        for method, c in CHOSEN.items():
            grid = [n for n in done if n.startswith(c.prefix)]
            if len(grid) == len(c.grid):
                pick = grid[0] if len(grid) == 1 else min(grid, key=lambda n: _validation_nll(done[n]))
                chosen[method][seed] = pick
                for row in (r for r in c.rows if r in SHOWN_ROWS):
                    methods[f"{method}{row}"] = (done[pick], ROWS[row])
        for method, (run_dir, options) in methods.items():
            scored = _scored(run_dir, TASK, method, None, True, **options)
            if scored is not None:
                rows.setdefault(method, []).append(scored)
                extra = json.loads((run_dir / "metrics.json").read_text()).get(f"{TASK}/test/{method}", {})
                cost.setdefault(method, []).append((len(json.loads((run_dir / "history.json").read_text())),
                                                    _seconds(run_dir) + extra.get("search_seconds", 0.0)))
                if method == "scale-search":
                    scales[seed] = extra["scale"]
    full = {m: v for m, v in rows.items() if len(v) == len(seeds)}
    differences = _differences(full, resamples)
    map_seconds = statistics.mean(s for _, s in cost["map"]) if "map" in cost else float("nan")
    lines = [f"{TESTBED['model']} on {DESCRIPTION}, seeds {seeds}; "
             f"ECE in %, 15 bins; mean ± std over seeds; differences on the seeds' pooled test predictions "
             f"[95 % paired bootstrap interval, {resamples} resamples]; cost: training steps and seconds "
             f"(sum of the steps' times) and their ratio to MAP's training.", "",
             "| method | steps | train s | × MAP | accuracy % | ECE % | NLL | Brier | ΔNLL vs MAP | ΔECE vs MAP | "
             "ΔNLL vs MAP+TS | ΔECE vs MAP+TS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary: dict[str, Any] = {}
    for method in ("map", "map+ts", "blob-ref", "blob-cycles",
                   *(f"{m}{r}" for m, c in CHOSEN.items() for r in ROWS if r in c.rows), "scale-search"):
        if method not in rows:
            continue
        ms = [compute_metrics(p, lab).as_dict() for p, lab in rows[method]]
        steps, secs = statistics.mean(s for s, _ in cost[method]), statistics.mean(s for _, s in cost[method])
        cells = []
        for ref in ("map", "map+ts"):
            for metric in ("nll", "ece"):
                d = differences.get(method, {}).get(ref, {}).get(metric)
                cells.append("" if d is None else f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
        label = method if len(ms) == len(seeds) else f"{method} ({len(ms)} of {len(seeds)} seeds)"
        lines.append(f"| {label} | {steps:.0f} | {secs:.0f} | {secs / map_seconds:.1f} | "
                     f"{_fmt([m['accuracy'] for m in ms])} | {_fmt([m['ece'] for m in ms])} | "
                     f"{_fmt([m['nll'] for m in ms], digits=3)} | {_fmt([m['brier'] for m in ms], digits=3)} | "
                     + " | ".join(cells) + " |")
        summary[method] = {"metrics": ms, "steps": steps, "train_seconds": secs}
    for method, c in CHOSEN.items():
        prefix, label, grid = c.prefix, c.label, c.grid
        if chosen[method]:
            lines += ["", f"{label} of {method} (chosen on validation NLL among "
                          f"{', '.join(f'{v:g}' for v in grid)}): "
                      + ", ".join(f"seed {s}: {n.removeprefix(prefix)}" for s, n in sorted(chosen[method].items()))]
    if scales:
        lines += ["", "Scale chosen on validation NLL (scale-search; its seconds add the search to MAP's training): "
                  + ", ".join(f"seed {s}: {v:g}" for s, v in sorted(scales.items()))]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    atomic_write_json(out / "results.json", {"seeds": seeds, "methods": summary, "paired_differences": differences,
                                             "chosen": {m: {str(k): v for k, v in c.items()} for m, c in chosen.items()}})
    _plot_sigma(seeds, root, out / "sigma.png")
    print("\n".join(lines))


def _plot_sigma(seeds: list[int], root: Path, path: Path) -> None:
    """``sigma``'s mean over all ``A`` entries along training (``history.json``), per seed and run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed in seeds:
        for name, style in (("blob-ref", "-"), ("blob-cycles", "--")):
            f = root / f"seed{seed}" / name / "history.json"
            if not f.is_file():
                continue
            points = [(h["step"] + 1, h["sigma_mean"]) for h in json.loads(f.read_text()) if "sigma_mean" in h]
            if points:
                ax.plot(*zip(*points), style, label=f"{name} seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean sigma over all A entries")
    ax.set_yscale("log")
    if not ax.lines:  # no reference-recipe run on this testbed: nothing to plot
        plt.close(fig)
        return
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", choices=sorted(CELL_RUNS), default=sorted(CELL_RUNS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs-dir", default="runs/variational")
    ap.add_argument("--out", default="docs/results/variational-sst2")
    ap.add_argument("--tables", action="store_true", help="train nothing: write the tables of what has finished")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--testbed", choices=sorted(TESTBEDS), default="smollm2")
    ap.add_argument("--weights", type=float, nargs="+", default=None,
                    help="the KL weights blob-adam chooses among on validation NLL (default: 1, 0.1, 0.01)")
    ap.add_argument("--ab-weights", type=float, nargs="+", default=None,
                    help="the KL weights blob-adam-ab chooses among (default: --weights)")
    ap.add_argument("--ess", type=float, nargs="+", default=None,
                    help="the effective sample sizes (multiples of N) ivon chooses among on validation NLL "
                         "(default: 1, 10, 100)")
    ap.add_argument("--rows", nargs="+", choices=sorted(ROW_NAMES), default=sorted(ROW_NAMES),
                    help="the chosen guides' rows to score and show: nn (N-sample), ts (temperature-scaled), "
                         "glm (linearised), glm-val (linearised under the prior chosen on validation)")
    args = ap.parse_args()
    global TESTBED, TASK, DESCRIPTION, SHOWN_ROWS
    SHOWN_ROWS = {ROW_NAMES[r] for r in args.rows}
    TESTBED, TASK, DESCRIPTION = TESTBEDS[args.testbed]
    weights = tuple(args.weights) if args.weights else W_GRID
    for method, grid in (("blob-adam", weights), ("blob-adam-ab", tuple(args.ab_weights or weights)),
                         ("ivon", tuple(args.ess or ESS_GRID))):
        CHOSEN[method] = replace(CHOSEN[method], grid=grid)
    root = Path(args.runs_dir)
    if not args.tables:
        run_cells(args.cells, args.seeds, root)
    tables(args.seeds, root, Path(args.out), args.resamples, search="scale-search" in args.cells)


if __name__ == "__main__":
    main()
