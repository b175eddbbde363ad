"""The README's commands, the Python examples of the README and the docs stay true, and the docs
build strictly (a broken link or reference fails)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert "pyro-llm compare" in block[0]
    assert "pytest" in block[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q tests" in ci and "python3 -m pytest -q tests" in block[1]


def test_readme_is_a_front_door_and_nothing_points_outside_the_repository():
    assert len(README.splitlines()) <= 150
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and "/work/" not in text, path
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith(("http://", "https://")):
                assert (path.parent / target).resolve().is_relative_to(ROOT), (path, target)
                assert (path.parent / target).exists(), (path, target)


@pytest.fixture(scope="module")
def tiny_sst2_llama(tmp_path_factory):
    from tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-sst2"), task="sst2")


def _blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _small(code, model):
    code = code.replace('"smollm2-135m"', repr(str(model))).replace("steps=150", "steps=2").replace(
        "steps=100", "steps=2").replace("range(150)", "range(2)").replace("num_samples=10", "num_samples=2")
    return code.replace("fractions=(0.1, 0.3, 0.6))", "fractions=(0.1, 0.3, 0.6), limit=16)")


def test_readme_quickstart_runs(tiny_sst2_llama):
    namespace: dict = {}
    exec(compile(_small(_blocks(README)[0], tiny_sst2_llama), "README.md", "exec"), namespace)
    assert namespace["probs"].shape == (16, 2)
    assert float(namespace["fit"].guide.prior_precision.reshape(-1)[0]) > 0
    assert len(list(namespace["map_guide"].parameters())) == len(namespace["model"].sites)


def test_docs_quickstart_and_guides_examples_run(tiny_sst2_llama):
    quick = _blocks((ROOT / "docs" / "quickstart.md").read_text())
    guides = _blocks((ROOT / "docs" / "guides-and-priors.md").read_text())
    code = "\n".join(_small(block, tiny_sst2_llama) for block in (quick[0], quick[1], guides[0]))
    code = code.replace('dict(fractions=(0.1, 0.3, 0.6))', 'dict(fractions=(0.1, 0.3, 0.6), limit=16)')
    namespace: dict = {}
    exec(compile(code, "docs", "exec"), namespace)
    assert namespace["probs"].shape == (16, 2)
    assert set(namespace["fit"].guide.blocks) == set(namespace["model"].site_names)


def test_the_documentation_builds_strictly(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("BayesianLoRAModel", "BLoBGuide", "fit_laplace", "SVITrainer", "SVIConfig", "LaplaceRunConfig",
                 "ZeroShotConfig", "OptimConfig"):
        assert name in api, name
