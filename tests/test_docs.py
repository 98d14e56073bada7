"""The documentation builds without warnings and the API reference points at modules that import."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"


def _mkdocs() -> str:
    beside_python = Path(sys.executable).parent / "mkdocs"
    found = str(beside_python) if beside_python.is_file() else shutil.which("mkdocs")
    if found is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    return found


def _references() -> list[str]:
    return re.findall(r"^:::\s+([\w.]+)\s*$", REFERENCE.read_text(encoding="utf-8"), flags=re.MULTILINE)


def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"


def test_reference_lists_modules():
    assert _references(), f"no ::: references found in {REFERENCE}"


@pytest.mark.parametrize("identifier", _references())
def test_reference_imports(identifier):
    """Each `::: name` is a module, or an object reached from the longest importable module prefix."""
    parts = identifier.split(".")
    for split in range(len(parts), 0, -1):
        name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # the module exists but one of its imports is missing
                raise
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return
    pytest.fail(f"no module of {identifier!r} imports")
