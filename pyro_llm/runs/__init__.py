"""The run layer: configurations, the registry of names, and runs as plain Python functions
(train, fit a Laplace posterior, evaluate, zero-shot) that the CLI calls. It sits on top of the
library: nothing in :mod:`pyro_llm`'s other packages imports it.

Modules: :mod:`.config` (one configuration per run kind from shared sections, presets), :mod:`.registry`
(names -> objects), :mod:`.folder` (what a run may write and replace), :mod:`.common` (building,
scoring), :mod:`.svi`, :mod:`.laplace`, :mod:`.zero_shot`, :mod:`.load` (any saved run), :mod:`.compare` (a plain
fine-tune beside its Bayesian counterparts), :mod:`.compat` (run folders of earlier releases).
"""

from .common import (LoadedRun, build_for, load_predictions, load_split, read_config, record_metrics, retarget_head,
                     run_config_of)
from .compare import COMPARE_METHODS, DEFAULT_METHODS, QUICK, Comparison, compare
from .config import (CONFIG_KINDS, PRESETS, BaseRunConfig, DataConfig, EvalConfig, GuideConfig, LaplaceConfig,
                     LaplaceRunConfig, ModelConfig, ObjectiveConfig, PriorConfig, SVIConfig, ZeroShotConfig,
                     preset_config)
from .folder import RunDirExistsError, RunFolder, is_run
from .laplace import LaplaceRun, laplace, load_laplace_run, resolve_adapter
from .load import evaluate, evaluate_ensemble, load_run, predictor
from .registry import ELBOS, GUIDES, KL_SCHEDULES, PREDICTIVES, PRIORS, GuideEntry, make_guide
from .svi import evaluate_loaded, linearised_predictor, load_svi_run, svi_predictor, train
from .zero_shot import load_zero_shot_run, zero_shot, zero_shot_predictor

__all__ = [
    "BaseRunConfig", "COMPARE_METHODS", "CONFIG_KINDS", "Comparison", "DEFAULT_METHODS", "DataConfig", "ELBOS",
    "EvalConfig", "GUIDES", "GuideConfig", "GuideEntry", "KL_SCHEDULES", "LaplaceConfig", "LaplaceRun",
    "LaplaceRunConfig", "LoadedRun", "ModelConfig", "ObjectiveConfig", "PREDICTIVES", "PRESETS", "PRIORS",
    "PriorConfig", "QUICK", "RunDirExistsError", "RunFolder", "SVIConfig", "ZeroShotConfig", "build_for", "compare",
    "evaluate", "evaluate_ensemble", "evaluate_loaded", "is_run", "laplace", "load_laplace_run", "load_predictions",
    "load_run", "load_split", "load_svi_run", "load_zero_shot_run", "make_guide", "predictor", "preset_config",
    "read_config", "record_metrics", "resolve_adapter", "retarget_head", "run_config_of", "svi_predictor", "linearised_predictor", "train",
    "zero_shot", "zero_shot_predictor",
]
