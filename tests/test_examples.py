"""The README's snippets and the scripts in examples/ run as written (users copy them)."""

import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(section: str) -> str:
    """The first ```python block under the README heading `section`."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(f"\n## {section}\n"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_readme_optimizer_snippet_trains(capsys):
    namespace: dict = {}
    exec(compile(readme_block("Optimizers"), "README.md", "exec"), namespace)
    assert namespace["loss"].item() < 0.5 * namespace["first"]
    assert capsys.readouterr().out.startswith("loss ")


def test_optimizers_alone_example_learns(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["optimizers_alone.py"])
    example = runpy.run_path(str(ROOT / "examples" / "optimizers_alone.py"))
    assert example["train"]("lars", steps=25) > 0.9
    assert example["train"]("lamb", steps=25) > 0.9
