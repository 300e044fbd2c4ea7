"""Every ``python`` code block of the README and docs/ runs (so the docs cannot rot)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks():
    out = []
    for path in DOCS:
        text = path.read_text()
        ns_blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        if ns_blocks:
            out.append(pytest.param(ns_blocks, id=path.name))
    return out


@pytest.mark.parametrize("code_blocks", blocks())
def test_doc_blocks_run(code_blocks):
    ns: dict = {}
    for code in code_blocks:  # blocks of one page share a namespace, in order
        exec(compile(code, "<doc>", "exec"), ns)


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(script):
    import runpy

    runpy.run_path(str(script), run_name="__main__")


def test_docs_build(tmp_path):
    """The mkdocs site builds with --strict (broken links or nav fail)."""
    import shutil
    import subprocess

    if shutil.which("mkdocs") is None:
        pytest.skip("mkdocs not installed")
    out = subprocess.run(
        ["mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").exists()
