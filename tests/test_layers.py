"""The package reads as the pipeline: a module imports only from its own package or from
packages below it (docs/usage.md, "Layout"). Lazy imports inside functions count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from repo_paths import SRC as _SRC

SRC = _SRC / "aepo"

# lowest first; packages on one line are independent of each other
LAYERS: list[set[str]] = [
    {"aepo", "aepo.io", "aepo.errors", "aepo.types", "aepo.catalogue", "aepo.registry"},
    {"aepo.console"},
    {"aepo.tools"},
    {"aepo.protocol", "aepo.algos"},
    {"aepo.formats"},
    {"aepo.models", "aepo.rewards", "aepo.data"},
    {"aepo.rollout"},
    {"aepo.config"},
    {"aepo.train"},
    {"aepo.eval", "aepo.integrations"},
    {"aepo.demo"},
    {"aepo.cli"},
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def unit(module: str) -> str:
    """The top-level unit of a dotted module name: aepo.rollout.sampler.cache -> aepo.rollout."""
    parts = module.split(".")
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "aepo":  # "from aepo import rewards" imports aepo.rewards
                found += [(node.lineno, f"aepo.{a.name}") for a in node.names if (SRC / a.name).exists()
                          or (SRC / f"{a.name}.py").exists()]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m == "aepo" or m.startswith("aepo.")]


def test_every_package_has_a_layer():
    units = {unit(module_name(p)) for p in SRC.rglob("*.py")}
    missing = sorted(units - set(LAYER))
    assert not missing, f"packages without a layer in LAYERS: {missing}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_downward(path: Path):
    me = unit(module_name(path))
    bad = []
    for line, mod in imports(path):
        other = unit(mod)
        if other == me or other == "aepo":
            continue
        if LAYER[other] >= LAYER[me]:
            bad.append(f"line {line}: {mod} (layer {LAYER[other]}) from {me} (layer {LAYER[me]})")
    assert not bad, "imports from the same layer or above:\n" + "\n".join(bad)


def test_the_check_can_fail(tmp_path: Path):
    # an upward import is reported by the same parser
    f = SRC / "errors.py"
    fake = tmp_path / "x.py"
    fake.write_text(f.read_text() + "\nfrom aepo.train.rl import RLTrainer\n")
    assert any(unit(m) == "aepo.train" for _, m in imports(fake))
