"""Tasks, prompts, splits and batching."""

from .collate import EncodedDataset, encode_examples, in_row_order
from .examples import LETTERS, Example
from .prompts import answer_strings, format_multiple_choice
from .sources import DataFileError, read_user_file
from .split import seeded_split
from .tasks import (CLASSIFICATION, CLOZE, MULTIPLE_CHOICE, TASKS, TaskSpec, UnknownTaskError, get_task, list_tasks,
                    load_examples)

__all__ = [
    "CLASSIFICATION", "CLOZE", "MULTIPLE_CHOICE", "TASKS", "DataFileError", "EncodedDataset", "Example", "LETTERS",
    "TaskSpec", "UnknownTaskError", "answer_strings", "encode_examples", "format_multiple_choice", "get_task", "in_row_order",
    "list_tasks", "load_examples", "read_user_file", "seeded_split",
]
