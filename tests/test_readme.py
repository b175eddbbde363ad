"""The README's commands and Python example stay true."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert "pyro-llm svi-train" in block[0] and "--task arc-easy" in block[0]
    assert "pytest" in block[1]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python3 -m pytest -q tests" in ci and "python3 -m pytest -q tests" in block[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_python_example_runs(tiny_llama):
    code = _python_blocks()[0]
    code = code.replace('"smollm2-135m"', repr(str(tiny_llama))).replace("range(100)", "range(2)")
    code = code.replace('load_examples(task, "test")', 'load_examples(task, "test", limit=4)')
    code = code.replace('load_examples(task, "train")', 'load_examples(task, "train", limit=16)')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["probs"].shape == (4, 5)


def test_readme_swap_a_guide_or_a_prior_runs(tiny_llama):
    """The "Swap a guide or a prior" section, run after the first example on the tiny Llama."""
    first, swap = _python_blocks()[:2]
    first = first.replace('"smollm2-135m"', repr(str(tiny_llama))).replace("range(100)", "range(2)")
    first = first.replace('load_examples(task, "test")', 'load_examples(task, "test", limit=4)')
    first = first.replace('load_examples(task, "train")', 'load_examples(task, "train", limit=16)')
    swap = swap.replace("steps=100", "steps=2")
    namespace: dict = {}
    exec(compile(first + "\n" + swap, "README.md", "exec"), namespace)
    fit = namespace["fit"]
    assert namespace["probs"].shape == (4, 5)
    assert float(fit.guide.prior_precision.reshape(-1)[0]) > 0
    assert len(list(namespace["map_guide"].parameters())) == len(namespace["model"].sites)
