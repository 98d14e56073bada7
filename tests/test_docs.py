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


def _nav_pages() -> list[str]:
    return re.findall(r":\s+([\w/]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), flags=re.MULTILINE)


def test_index_next_steps_link_every_page():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    next_steps = index.split("## Where to go next", 1)[1]
    missing = [page for page in _nav_pages() if page != "index.md" and f"({page})" not in next_steps]
    assert not missing, f"docs/index.md 'Where to go next' misses {missing}"


def test_readme_lists_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [page for page in _nav_pages() if f"(docs/{page})" not in readme]
    assert not missing, f"README.md's documentation list misses {missing}"


def test_which_cache_page_covers_every_backend_and_hook():
    import hf_neuralcache

    page = (ROOT / "docs" / "choosing.md").read_text(encoding="utf-8")
    assert "| Goal | Use | Cost | Exact? |" in page
    for name in [*hf_neuralcache.available_caches(), "prefix cache", "inference cache", "semantic cache"]:
        assert name in page, f"docs/choosing.md does not mention {name}"


def test_tensor_cache_page_has_an_options_table_and_says_experimental():
    from hf_neuralcache import TensorCache

    page = (ROOT / "docs" / "tensor_cache.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", page, flags=re.MULTILINE))
    assert set(TensorCache.options) <= rows, f"docs/tensor_cache.md has no row for {set(TensorCache.options) - rows}"
    assert "Experimental" in page
    for path in ("README.md", "docs/index.md"):
        (row,) = [line for line in (ROOT / path).read_text().splitlines() if line.startswith("| `tensor_cache` |")]
        assert "experimental" in row, f"{path}: tensor_cache is not marked experimental"


def test_pages_do_not_call_available_features_planned():
    stale = {
        "docs/models.md": ["planned semantic cache"],
        "docs/cli.md": ["[`PrefixCache`](prefix_cache.md) or an\n[`InferenceCache`](inference_cache.md);"],
    }
    for path, phrases in stale.items():
        text = (ROOT / path).read_text(encoding="utf-8")
        for phrase in phrases:
            assert phrase not in text, f"{path} still says {phrase!r}"
    assert "SemanticCache" in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")


def test_docs_show_the_current_cache_keyword():
    quickstart = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    assert "CACHE_KWARG" in quickstart and "past_key_values=cache" not in quickstart
