import json

import pytest

from pyro_llm.data import DataFileError, UnknownTaskError, get_task, load_examples, read_user_file, seeded_split

OFFLINE = ["arc-easy", "arc-challenge", "openbookqa", "winogrande", "boolq", "commonsense-qa", "sst2", "rte", "mrpc"]


def _keys(examples):
    return {(e.text, e.text_pair) for e in examples}


@pytest.mark.parametrize("task", OFFLINE)
def test_seeded_splits_are_disjoint_and_cover_the_pool(task):
    parts = {s: load_examples(task, s) for s in ("train", "validation", "test")}
    assert all(parts.values())
    assert not _keys(parts["train"]) & _keys(parts["test"])
    assert not _keys(parts["train"]) & _keys(parts["validation"])
    assert not _keys(parts["validation"]) & _keys(parts["test"])
    again = load_examples(task, "test")
    assert [e.text for e in again] == [e.text for e in parts["test"]]


def test_split_seed_changes_the_split_and_limit_is_a_subset():
    a = load_examples("arc-easy", "test", split_seed=0)
    b = load_examples("arc-easy", "test", split_seed=1)
    assert _keys(a) != _keys(b)
    sub = load_examples("arc-easy", "test", limit=20)
    assert len(sub) == 20 and _keys(sub) <= _keys(a)


def test_duplicate_texts_never_straddle_splits():
    from pyro_llm.data import Example

    exs = [Example(f"q{i % 7}", 0, 2) for i in range(50)]
    parts = [seeded_split(exs, s, fractions=(0.5, 0.2, 0.3)) for s in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == 50
    assert not _keys(parts[0]) & _keys(parts[2])


def test_prompt_format_and_labels():
    ex = load_examples("arc-easy", "test")[0]
    assert ex.text.startswith("Question: ") and ex.text.endswith("\nAnswer:")
    assert "\nA. " in ex.text and 0 <= ex.label < ex.num_choices
    wg = load_examples("winogrande", "train")[0]
    assert wg.num_choices == 2 and "_" in wg.text


def test_mmlu_native_splits():
    t = load_examples("mmlu-college-chemistry", "test")
    assert len(t) == 100 and all(e.num_choices == 4 for e in t)


def test_unknown_task_lists_choices():
    with pytest.raises(UnknownTaskError, match="arc-easy") as err:
        get_task("arc-eazy")
    assert "Did you mean arc-easy" in str(err.value)


def test_user_jsonl_and_csv(tmp_path):
    rows = [{"question": f"What is {i}+1?", "choices": [str(i + 1), str(i + 2), "7"], "answer": "A"} for i in range(30)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples, splits = read_user_file(path)
    assert len(examples) == 30 and examples[0].label == 0 and examples[0].num_choices == 3
    task = get_task(str(path))
    train, test = load_examples(task, "train"), load_examples(task, "test")
    assert train and test and not _keys(train) & _keys(test)
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("question,A,B,answer\nSky colour?,blue,green,0\n")
    ex, _ = read_user_file(csv_path)
    assert ex[0].num_choices == 2 and "A. blue" in ex[0].text


def test_missing_field_names_field_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
                    + json.dumps({"question": "q2", "answer": 1}) + "\n")
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: missing required field 'choices'"):
        read_user_file(path)
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(DataFileError, match=r":1: field 'answer' = 5 is out of range"):
        read_user_file(path)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("question,A,answer\nq,a,0\n")
    with pytest.raises(DataFileError, match="missing required column 'B'"):
        read_user_file(csv_path)


@pytest.mark.parametrize("name,parts,n_choices", [
    ("sciq", ("sciq", "none", "validation"), 4), ("piqa", ("piqa", "plain_text", "validation"), 2),
    ("social-iqa", ("social_i_qa", "none", "validation"), 3), ("copa", ("super_glue", "copa", "validation"), 2),
    ("cb", ("super_glue", "cb", "validation"), 3), ("hellaswag", ("hellaswag", "none", "validation"), 4)])
def test_offline_multiple_choice_tasks_keep_every_row_and_its_answer(name, parts, n_choices):
    from pyro_llm.data.sources import load_olmo_split

    raw = load_olmo_split(*parts)
    splits = {s: load_examples(name, s) for s in ("train", "validation", "test")}
    assert sum(len(v) for v in splits.values()) == len(raw)  # a partition of the shipped rows
    examples = [e for v in splits.values() for e in v]
    assert all(e.num_choices == n_choices and 0 <= e.label < n_choices for e in examples)
    assert len({e.label for e in examples}) == n_choices  # every answer position occurs
    if name == "sciq":  # the lettered choice at the label is the shipped correct answer
        answers = {r["question"]: r["correct_answer"] for r in raw}
        for e in examples[:50]:
            question = e.text.split("Question: ")[1].split("\n")[0]
            line = [ln for ln in e.text.splitlines() if ln.startswith(f"{'ABCD'[e.label]}. ")][0]
            assert line[3:] == answers[question]


def test_split_fractions_cut_the_same_pool_and_imdb_is_test_only():
    """A test-heavy cut of SST-2 (the study's) is a partition of the same pool as the default cut;
    IMDB's sample is an out-of-distribution test set only."""
    parts = {s: load_examples("sst2", s, fractions=(0.3, 0.1, 0.6)) for s in ("train", "validation", "test")}
    default = {s: load_examples("sst2", s) for s in ("train", "validation", "test")}
    texts = lambda d: sorted(e.text for v in d.values() for e in v)  # noqa: E731
    assert texts(parts) == texts(default)
    assert len(parts["test"]) >= 500 and len(parts["test"]) > len(default["test"])
    assert not {e.text for e in parts["train"]} & {e.text for e in parts["test"]}
    assert [len(load_examples("imdb", s)) for s in ("train", "validation", "test")] == [0, 0, 200]
