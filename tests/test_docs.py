"""The documentation builds with warnings as errors, its Python examples run as written, and the flags it names exist.

    .venv/bin/python -m pytest tests/test_docs.py -q        # ~15 s on 2 cores (the build runs beside the examples)

The site is docs/*.md with mkdocs.yml at the repository root (`pip install -e '.[docs]'`; the build test is skipped
without mkdocs). On every page the ```python blocks run in order in one namespace, in a temporary directory (they
train tiny runs into runs/ there), so an example that stops working fails here. Shell blocks are not run, but every
flag a `largebatch <command> ...` line gives must be one of that command's (from its --help), and every dotted flag
(`--batch.global-batch`) anywhere in the docs or the README must be one of `largebatch train`'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
TEXTS = PAGES + [ROOT / "README.md"]
COMMANDS = ("train", "show-config", "study", "report", "probe", "plan")
DOCS_TOOLS = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python")  # the [docs] extra
FLAG = r"--[a-z][a-z0-9.-]*"


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module", autouse=True)
def site_build(tmp_path_factory):
    """`mkdocs build --strict` into a temporary folder, started in the background when the module starts so that it
    runs while the examples do; `test_site_builds_with_warnings_as_errors` (last) waits for it. None without mkdocs."""
    if not all(map(installed, DOCS_TOOLS)):
        yield None
        return
    out = tmp_path_factory.mktemp("docs")
    with open(out / "build.log", "w") as log:  # a file, not a pipe: nothing blocks the build while tests run
        build = subprocess.Popen([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                                  str(ROOT / "mkdocs.yml"), "--site-dir", str(out / "site")],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    yield build, out
    if build.poll() is None:  # only some tests were selected
        build.kill()
        build.wait()


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_python_examples_run_as_written(page, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # --threads auto: one thread, the build runs beside
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")  # the committed study results a page reads
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, block in enumerate(python_blocks(page), 1):
            exec(compile(block, f"{page.relative_to(ROOT)}, python block {i}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)  # a run sets it for the process
    assert capsys.readouterr().out  # every page's examples print what they show


@cache
def command_flags() -> dict[str, frozenset[str]]:
    """Each command's flags, read from its --help (tyro's boxes for train and show-config, argparse's for the rest)."""
    from largebatch import cli

    flags, environ = {}, dict(os.environ)
    try:
        os.environ["COLUMNS"] = "250"  # one flag per line, unwrapped
        for cmd in COMMANDS:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
                    contextlib.suppress(SystemExit):
                cli.main([cmd, "--help"])
            flags[cmd] = frozenset(re.findall(rf"(?<![\w-]){FLAG}", out.getvalue()))
    finally:  # the CLI sets OpenMP's wait policy for the process; leave the environment as it was
        os.environ.clear()
        os.environ.update(environ)
    for cmd in ("train", "show-config"):
        flags[cmd] |= {"--recipe", "--config", "--help"} | ({"--resume"} if cmd == "train" else set())
    return flags


def command_lines(text: str) -> list[str]:
    """Shell lines of fenced blocks (continuations joined, comments dropped) and inline code spans."""
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #")[0])
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return lines + re.findall(r"`([^`\n]+)`", prose)


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_named_exists(path):
    flags = command_flags()
    text = path.read_text()
    wrong = [f for f in re.findall(rf"(?<![\w.-]){FLAG}", text) if "." in f.rstrip(".") and f.rstrip(".") not in
             flags["train"]]
    for line in command_lines(text):
        for m in re.finditer(rf"\blargebatch ({'|'.join(COMMANDS)})\b(.*)", line):
            cmd, rest = m.group(1), re.split(r"\blargebatch \w|[|;]|&&", m.group(2))[0]
            wrong += [f"largebatch {cmd} {f}" for f in re.findall(rf"(?<![\w.-]){FLAG}", rest)
                      if f.rstrip(".") not in flags[cmd]]
    assert not wrong, f"{path.name} names flags that do not exist: {sorted(set(wrong))}"


def test_site_builds_with_warnings_as_errors(site_build):
    if site_build is None:
        pytest.skip(f"the docs tools ({', '.join(DOCS_TOOLS)}) are not installed: pip install -e '.[docs]'")
    build, out = site_build
    build.wait(timeout=600)
    assert build.returncode == 0, (out / "build.log").read_text()
    assert (out / "site" / "index.html").is_file() and (out / "site" / "api" / "optim" / "index.html").is_file()
