"""The user-facing docs stand on their own: README.md, docs/ and examples/ name no file
outside the repository (the design notes users do not have), and every repository path they
put in backticks exists."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(REPO.glob("examples/**/*.md"))]
OUTSIDE = ("SYSTEM.md", "shared/", "../shared", "STYLE.md", "KERNELS.md", "GPU.md", "MEGATRON_CPU.md")
# `tools/x.py`, `docs/x.md`, `examples/...`, `mmcap/...` in backticks (no globs or placeholders)
PATH = re.compile(r"`((?:tools|docs|examples|mmcap|tests)/[A-Za-z0-9_./-]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_files_in_the_repo(doc):
    text = doc.read_text(encoding="utf-8")
    assert not [w for w in OUTSIDE if w in text], f"{doc.name} points outside the repository"
    if doc.name == "README.md":
        return  # its status table names tools still to be built
    missing = [p for p in PATH.findall(text) if "<" not in p and not (REPO / p.rstrip("/.")).exists()]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
