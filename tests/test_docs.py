"""The package cites its own docs: every "docs/algorithms.md section N" in src/ names a section
that exists, and nothing cites files a user of the package does not have."""
from __future__ import annotations

import re
from pathlib import Path

from repo_paths import ROOT


def sources() -> list[Path]:
    return sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "src").rglob("*.yaml"))


def test_every_cited_section_exists():
    doc = (ROOT / "docs" / "algorithms.md").read_text()
    sections = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)?)[. ]", doc, re.MULTILINE))
    assert {"1", "2", "3", "3.2", "3.3", "4", "5", "6", "7", "8"} <= sections
    missing = []
    for path in sources():
        for m in re.finditer(r"docs/algorithms\.md section (\d+(?:\.\d+)?)", path.read_text()):
            if m.group(1) not in sections:
                missing.append(f"{path.relative_to(ROOT)}: section {m.group(1)}")
    assert not missing, missing


def test_no_citation_of_files_outside_the_repository():
    bad = [str(p.relative_to(ROOT)) for p in sources()
           if re.search(r"ALGORITHMS\.md|DESIGN\.md|\.\./shared", p.read_text())]
    assert not bad, bad
