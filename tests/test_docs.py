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


# ----------------------------------------------------------------------------- the guide and its pages

GUIDES = ["README.md", "docs/usage.md", "docs/gpu.md", "docs/verl.md", "docs/security.md", "examples/extend/README.md"]


def command_lines(text: str) -> list[str]:
    """The `aepo ...` commands of a page's bash blocks, continuation lines joined, one per pipe."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" | "):
                part = re.sub(r"^\S*(?:\.venv[^/]*/bin/)(?=aepo )", "", part.strip())
                if part.startswith("aepo "):
                    out.append(part)
    return out


def test_every_documented_command_and_option_exists():
    """Each `aepo` command line in the README and docs names a real (sub)command and only
    options it has: a renamed flag cannot leave the guide behind."""
    import shlex

    import typer.main

    from aepo.cli import app

    root = typer.main.get_command(app)
    bad, seen = [], 0
    for page in GUIDES:
        for line in command_lines((ROOT / page).read_text()):
            words = shlex.split(line, comments=True)[1:]
            cmd, path = root, ["aepo"]
            while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
                cmd = cmd.commands[words[0]]
                path.append(words.pop(0))
            if hasattr(cmd, "commands"):
                bad.append(f"{page}: {line!r}: no command after {' '.join(path)}")
                continue
            options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            flags = {w.strip("[]").split("=")[0] for w in words if w.strip("[]").startswith("--")}
            bad += [f"{page}: {' '.join(path)} has no option {f}" for f in sorted(flags - options)]
            seen += 1
    assert seen >= 15, seen  # the guide and usage pages do show the commands
    assert not bad, bad


def test_pages_the_docs_name_exist():
    """Every docs/*.md and benchmarks/*.md that the repository's text names is a file, and the
    README's quick start is the two quickstart commands."""
    texts = [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*"),
             ROOT / "README.md", ROOT / "quickstart.py", ROOT / "pyproject.toml", *(ROOT / "benchmarks").glob("*.md")]
    missing = sorted({f"{p.relative_to(ROOT)}: {m}" for p in texts if p.is_file() and p.suffix in (".py", ".md", ".toml",
                                                                                                   ".yaml", ".sh")
                      for m in re.findall(r"\b((?:docs|benchmarks)/[\w/.-]+\.md)\b", p.read_text())
                      if not (ROOT / m).is_file()})
    assert not missing, missing
    readme = (ROOT / "README.md").read_text()
    assert "python3 quickstart.py demo " in readme and "python3 quickstart.py test " in readme
    assert len(readme.splitlines()) <= 150


def test_no_citation_of_a_readme_section():
    """The reference left the README for docs/: nothing cites a README section any more."""
    texts = [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*"),
             *(ROOT / "tests").rglob("*.py"), ROOT / "pyproject.toml"]
    bad = [str(p.relative_to(ROOT)) for p in texts
           if p.is_file() and p.suffix in (".py", ".md", ".toml", ".yaml", ".sh")
           and re.search(r"README,? [\"'(]", p.read_text())]
    assert not bad, bad
