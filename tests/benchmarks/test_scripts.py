"""Every benchmark script runs the one way benchmarks/README.md says: `python benchmarks/<name>.py`
with argparse options, so `--help` prints its usage without running anything; and the index
lists every script."""
from __future__ import annotations

import runpy
import sys

import pytest
from repo_paths import ROOT

BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 15, SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_prints_usage_and_runs_nothing(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))  # as `python benchmarks/<name>.py` has it: sibling imports
    monkeypatch.setattr(sys, "argv", [str(BENCH / name), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / name), run_name="__main__")
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and name in out.splitlines()[0], out[:300]


def test_the_index_lists_every_script():
    index = (BENCH / "README.md").read_text()
    shell = sorted(p.name for p in BENCH.glob("*.sh"))
    missing = [name for name in [*SCRIPTS, *shell] if f"`{name}`" not in index]
    assert not missing, f"benchmarks/README.md does not index {missing}"


def test_smollm2_script_help_runs_nothing(tmp_path):
    """`--help` prints the usage and starts no command (no OUT directory appears)."""
    import subprocess

    res = subprocess.run(["bash", str(BENCH / "smollm2_hermes.sh"), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=30)
    assert res.returncode == 0 and "smollm2_hermes.sh SMOLLM2_DIR [OUT]" in res.stdout
    assert not (tmp_path / "runs").exists()
