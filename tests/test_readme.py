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


def test_readme_python_example_runs(tiny_llama):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    code = code.replace('"smollm2-135m"', repr(str(tiny_llama))).replace("range(100)", "range(2)")
    code = code.replace('load_examples(task, "test")', 'load_examples(task, "test", limit=4)')
    code = code.replace('load_examples(task, "train")', 'load_examples(task, "train", limit=16)')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["probs"].shape == (4, 5)
