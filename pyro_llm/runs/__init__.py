"""The run layer: configurations, the registry of names, and runs as plain Python functions
(train, fit a Laplace posterior, evaluate, zero-shot) that the CLI calls. It sits on top of the
library: nothing in :mod:`pyro_llm`'s other packages imports it.

Modules: :mod:`.config` (RunConfig, LaplaceConfig, presets), :mod:`.registry` (names -> objects),
:mod:`.common` (the run folder, building, scoring), :mod:`.svi`, :mod:`.laplace`,
:mod:`.zero_shot`, :mod:`.load` (any saved run).
"""

from .common import LoadedRun, RunDirExistsError, build_for, load_split, prepare_run_dir, read_config, \
    record_metrics, retarget_head
from .config import PRESETS, LaplaceConfig, RunConfig
from .laplace import LaplaceRun, laplace, load_laplace_run, resolve_adapter
from .load import evaluate, load_run
from .registry import ELBOS, GUIDES, KL_SCHEDULES, PREDICTIVES, PRIORS, GuideEntry, make_guide
from .svi import evaluate_loaded, load_svi_run, train
from .zero_shot import zero_shot

__all__ = [
    "ELBOS", "GUIDES", "GuideEntry", "KL_SCHEDULES", "LaplaceConfig", "LaplaceRun", "LoadedRun", "PREDICTIVES",
    "PRESETS", "PRIORS", "RunConfig", "RunDirExistsError", "build_for", "evaluate", "evaluate_loaded", "laplace",
    "load_laplace_run", "load_run", "load_split", "load_svi_run", "make_guide", "prepare_run_dir", "read_config",
    "record_metrics", "resolve_adapter", "retarget_head", "train", "zero_shot",
]
