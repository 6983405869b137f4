"""The README and docs/ point only at files a user has, in words a user can place."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_TOP = ("docs", "stn_jax", "configs", "scripts", "experiments", "tests", ".ci")


def _repo_paths(text: str) -> set[str]:
    """Repository paths a document names in backticks or as a markdown link target."""
    candidates = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
    paths = set()
    for c in candidates:
        c = c.split("#")[0].split(":")[0]  # configs/mnist_rts.py:model=cnn -> the file
        if c.split("/")[0] in _TOP and "/" in c and not re.search(r"[*{}<>]", c):
            paths.add(c)
    return paths


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_files_in_the_repo(doc):
    text = doc.read_text()
    assert "../shared" not in text and "/work/shared" not in text
    paths = _repo_paths(text)
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_of_no_issue_or_session(doc):
    # Users know the project, not the tracker or the work sessions that built it.
    hits = [line for line in doc.read_text().splitlines()
            if re.search(r"\b(issue|issues|session|sessions)\b", line, re.IGNORECASE)]
    assert not hits, hits


def test_repo_paths_are_found():
    text = ("see `docs/conventions.md`, `configs/mnist_rts.py:runlocal=True`, "
            "[x](docs/data.md#sources), `pictures/step_*.png`, `configs/mnist_{r,p}.py`, `a/b`")
    assert _repo_paths(text) == {"docs/conventions.md", "configs/mnist_rts.py", "docs/data.md"}
