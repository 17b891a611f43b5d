"""Helpers shared by the tests: tiny models, subprocess workers, the family matrix."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
