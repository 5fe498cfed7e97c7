"""The README's snippets and the scripts in examples/ run as written (users copy them)."""

import json
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


def test_readme_first_screen_trains_an_own_model(tmp_path, monkeypatch):
    """The snippet at the top of the README, as written (it trains into runs/ under the current directory)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text[: text.index("\n## ")], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    s = namespace["summary"]
    assert s["status"] == "completed" and s["accum_steps"] == 4 and s["peak_lr"] == 0.8


def run_example(name: str):
    return runpy.run_path(str(ROOT / "examples" / name), run_name="example")


def test_own_model_example_learns_with_lars(tmp_path):
    s = run_example("own_model.py")["main"](out=str(tmp_path), epochs=3, n=4096)
    assert s["status"] == "completed" and s["accum_steps"] == 4 and s["test_accuracy"] > 0.5


def test_regression_dataset_example_streams_and_learns(tmp_path):
    s = run_example("regression_dataset.py")["main"](out=str(tmp_path), epochs=10, n=4096, global_batch=1024,
                                                     base_lr=0.05)
    assert (s["task"], s["metric"]) == ("regression", "loss") and s["status"] == "completed"
    assert s["test_loss"] < 18  # predicting the mean scores the variance of y, about 24 (11.6 measured; noise 1)


def test_timm_example_builds_a_timm_model_by_name(tmp_path):
    s = run_example("timm_model.py")["main"](out=str(tmp_path), epochs=0.5, n=512)
    assert s["status"] == "completed"
    config = json.loads((Path(s_run_dir(tmp_path)) / "config.json").read_text())
    assert config["model"]["name"] == "timm:resnet10t"


def s_run_dir(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run
