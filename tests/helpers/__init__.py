"""Helpers shared by the tests: tiny models, subprocess workers, the family matrix."""

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]  # the repository root


def benchmark(name: str) -> ModuleType:
    """The script benchmarks/NAME.py as a module (the scripts import each other by module name)."""
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)
