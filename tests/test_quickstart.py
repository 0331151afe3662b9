"""constraints.txt: the exact versions the documented numbers were measured with, and quickstart.py's use of it."""
from __future__ import annotations

import ast
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from repo_paths import ROOT

CONSTRAINTS = ROOT / "constraints.txt"


def _quickstart():
    spec = importlib.util.spec_from_file_location("aepo_quickstart", ROOT / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pins(text: str) -> dict[str, Requirement]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name not in out, f"{name} is pinned twice"
            out[name] = req
    return out


def _pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier  # exactly one specifier ...
    assert spec.operator == "==" and "*" not in spec.version, f"{req} is not an exact pin"  # ... and it is name==version
    return spec.version


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _imported_distributions() -> set[str]:
    """The installed distributions that aepo's sources and the tests import (top-level names)."""
    modules: set[str] = set()
    for path in [*(ROOT / "src" / "aepo").rglob("*.py"), *(ROOT / "tests").rglob("*.py"), ROOT / "quickstart.py"]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    by_module = metadata.packages_distributions()
    dists = {canonicalize_name(d) for m in modules if m not in sys.stdlib_module_names for d in by_module.get(m, [])}
    return dists - {"aepo"}


def test_constraints_file_parses_into_exact_pins():
    pins = _pins(CONSTRAINTS.read_text())
    assert len(pins) >= 20
    for req in pins.values():
        _pinned_version(req)
        assert not req.extras and req.url is None, req
    assert "aepo" not in pins  # the package itself is never pinned
    for name in ("torch", "transformers", "tokenizers", "numpy", "safetensors", "huggingface-hub", "bm25s", "pyarrow",
                 "typer", "rich", "click", "matplotlib", "pyyaml", "jinja2", "regex", "pytest", "hypothesis"):
        assert name in pins, f"constraints.txt does not pin {name}"


def test_constraints_pin_every_imported_distribution():
    """Every installed distribution that src/aepo, the tests or quickstart.py import is pinned
    (verl, vLLM, wandb, ... are optional and not installed in the demo's venv, so not checked)."""
    pins = _pins(CONSTRAINTS.read_text())
    imported = _imported_distributions()
    assert {"torch", "transformers", "tokenizers", "numpy"} <= imported  # the scan itself works
    missing = sorted(imported - set(pins))
    assert not missing, f"imported but not pinned in constraints.txt: {missing}"


def test_pins_equal_the_installed_versions():
    """A stale constraints.txt (the venv the numbers come from moved on, or the file was edited
    by hand) fails here. Checked in a venv that quickstart.py installed with the file; one it
    installed without (AEPO_CONSTRAINTS=none, AEPO_EXTRAS) or a `pip install -e .` is not pinned."""
    record = Path(sys.prefix) / "aepo-constraints.txt"
    if not record.exists():
        pytest.skip("not a venv that quickstart.py installed (no aepo-constraints.txt in it)")
    if not any(name != "torch" for name in _pins(record.read_text())):
        pytest.skip("quickstart.py installed this venv without constraints.txt (AEPO_CONSTRAINTS / AEPO_EXTRAS)")
    venv_torch = Version(_pinned_version(_pins(record.read_text())["torch"])).public
    stale = []
    for name, req in _pins(CONSTRAINTS.read_text()).items():
        if req.marker is not None and not req.marker.evaluate():
            continue
        have, want = _installed(name), _pinned_version(req)
        if name == "torch" and venv_torch != Version(want).public:
            continue  # AEPO_TORCH chose another torch: the file's torch line gave way to it
        # a local label (torch's +cpu) is the build, not the release
        if have is None or Version(have).public != Version(want).public:
            stale.append(f"{name}: constraints.txt {want}, installed {have}")
    assert not stale, "constraints.txt does not match this environment (rerun quickstart.py, or regenerate it): " \
        + "; ".join(stale)


def test_constraints_torch_matches_quickstart_default():
    pins = _pins(CONSTRAINTS.read_text())
    assert _quickstart().DEFAULT_TORCH == f"torch=={_pinned_version(pins['torch'])}"


def test_install_digest_follows_the_constraints_text():
    qs = _quickstart()
    text = CONSTRAINTS.read_text()
    base = qs.install_digest(b"[project]", "dev", text)
    assert base == qs.install_digest(b"[project]", "dev", text)
    assert base != qs.install_digest(b"[project]", "dev", text.replace("transformers==", "transformers==0"))
    assert base != qs.install_digest(b"[project]", "dev", text + "# a comment\n")
    assert base != qs.install_digest(b"[project]", "dev", "")  # AEPO_CONSTRAINTS=none
    assert base != qs.install_digest(b"[project] ", "dev", text)
    assert base != qs.install_digest(b"[project]", "dev,math", text)
    # the parts cannot run into each other
    assert qs.install_digest(b"a", "b", "c") != qs.install_digest(b"ab", "", "c")


def test_merge_constraints_keeps_the_installed_torch():
    qs = _quickstart()
    text = "# header\ntorch==2.13.0; python_version >= \"3.11\"\nTransformers==5.25.0\ntorchvision==1.0\n"
    merged = qs.merge_constraints(text, "2.14.0+cu130")
    pins = _pins(merged)
    assert str(pins["torch"].specifier) == "==2.14.0+cu130"
    assert str(pins["transformers"].specifier) == "==5.25.0"
    assert "torchvision" in pins  # only torch's own line goes
    assert _pins(qs.merge_constraints("", "2.13.0+cpu")).keys() == {"torch"}
    # the real file merged with its own torch: one torch line
    assert len([ln for ln in qs.merge_constraints(CONSTRAINTS.read_text(), "2.13.0").splitlines()
                if ln.startswith("torch==")]) == 1


def test_aepo_constraints_none_and_extras_skip_the_file(monkeypatch, tmp_path):
    qs = _quickstart()
    monkeypatch.delenv("AEPO_CONSTRAINTS", raising=False)
    assert qs._constraints_text(False) == CONSTRAINTS.read_text()
    assert qs._constraints_text(True) == ""
    monkeypatch.setenv("AEPO_CONSTRAINTS", "none")
    assert qs._constraints_text(False) == ""
    other = tmp_path / "c.txt"
    other.write_text("numpy==2.4.6\n")
    monkeypatch.setenv("AEPO_CONSTRAINTS", str(other))
    assert qs._constraints_text(True) == "numpy==2.4.6\n"


@pytest.mark.parametrize("extra", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_run_that_collects_no_tests_fails(tmp_path, monkeypatch, extra):
    """pytest's exit status 5 (nothing collected, e.g. a mistyped path) is a failure of
    `quickstart.py test`, serial or under pytest-xdist, never a pass."""
    qs = _quickstart()
    monkeypatch.setattr(qs, "ensure_env", lambda: None)  # the running interpreter is the venv
    monkeypatch.setattr(qs, "PY", Path(sys.executable))
    (tmp_path / "empty").mkdir()
    assert qs.main(["test", "-q", "-p", "no:cacheprovider", *extra, str(tmp_path / "empty")]) == 1
