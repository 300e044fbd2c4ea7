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
    hint = "\n(the API reference needs the test extra: pip install -e '.[test]')"
    assert out.returncode == 0, out.stdout + out.stderr + hint
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "operators" / "index.html").exists()


def _resolve(path: str):
    """The object a ``::: a.b.c`` directive documents (module, or attribute of one)."""
    import importlib

    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for name in parts[k:]:
            obj = getattr(obj, name)
        return obj
    raise ValueError(path)


def test_api_reference_covers_the_public_api():
    """Every name in ``hessinv.__all__``, ``hessinv.solvers.__all__`` and ``hessinv.optim.__all__``
    is documented in docs/api (its own directive, or its module's with members)."""
    import hessinv

    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs" / "api").glob("*.md")))
    paths = re.findall(r"^::: ([\w.]+)((?:\n {4}.*)*)", text, flags=re.M)
    objects = {id(_resolve(path)) for path, _ in paths}
    with_members = [_resolve(path) for path, opts in paths if "members: false" not in opts]
    missing = []
    for mod in (hessinv, hessinv.solvers, hessinv.optim):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if id(obj) in objects:
                continue
            if any(getattr(m, name, None) is obj for m in with_members):
                continue
            if isinstance(obj, (int, str, dict, tuple, frozenset, list)):
                continue  # constants are described in their module's docstring
            missing.append(f"{mod.__name__}.{name}")
    assert not missing, f"add to docs/api/*.md: {missing}"
