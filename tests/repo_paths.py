"""Where the tests find the checkout and the shared data, wherever in tests/ they live.

The shared data (benchmarks, search cache) sits in ../shared beside the checkout.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: src/, docs/, examples/, tests/
SRC = ROOT / "src"
SHARED = ROOT.parent / "shared"
