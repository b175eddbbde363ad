import os
import sys
from pathlib import Path

import pyro
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_tiny_bert, save_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_pyro():
    """Every test starts with an empty parameter store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def arc_model(tiny_llama):
    """A tiny Llama with LoRA on q/v as a BayesianLoRAModel on ARC-Easy, and its train data."""
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.models import build_model

    task = get_task("arc-easy")
    train = load_examples(task, "train", limit=32)
    model, tok = build_model(str(tiny_llama), task, dataset_size=len(train))
    data = encode_examples(train, tok, task.num_classes, max_length=128)
    return model, data


if "OMP_NUM_THREADS" not in os.environ:  # otherwise the suite runs at the thread count it is given
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
