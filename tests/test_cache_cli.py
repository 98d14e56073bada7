"""`hf-neuralcache cache stats|ls|prune|clear DIR` on real cache folders."""

from __future__ import annotations

import re
import sqlite3

import pytest
import torch

from hf_neuralcache import InferenceCache, PrefixCache
from hf_neuralcache.cli import main
from hf_neuralcache.models import tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama")
    prefix = PrefixCache(root / "prefix", chunk_tokens=8)
    inference = InferenceCache(root / "inference", ttl=3600)
    for seed in range(3):
        x = torch.randint(5, 120, (1, 20), generator=torch.Generator().manual_seed(seed))
        for _ in range(2):
            model.generate(x, max_new_tokens=2, prefix_cache=prefix, inference_cache=inference)
    prefix.close()
    inference.close()
    return root


def test_stats_shows_entries_and_totals_of_all_processes(folders, capsys):
    assert main(["cache", "stats", str(folders / "inference")]) == 0
    out = capsys.readouterr().out
    assert "inference cache at" in out and "entries: 3," in out and "hits: 3" in out and "misses: 3" in out
    assert main(["cache", "stats", str(folders / "prefix")]) == 0
    out = capsys.readouterr().out
    assert "prefix cache at" in out and "entries: 6," in out and "measured prefill_seconds_per_token" in out


def test_ls_lists_entries(folders, capsys):
    assert main(["cache", "ls", str(folders / "prefix"), "--limit", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "'chunk_tokens': 8" in lines[0] and lines[-1].startswith("... (first 4 of 6")
    assert main(["cache", "ls", str(folders / "inference")]) == 0
    assert "'output': 'tensor'" in capsys.readouterr().out


def test_prune_removes_bad_entries_and_shrinks(tmp_path, folders, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders / "prefix", copy)
    db = sqlite3.connect(copy / "entries" / "cache.db")
    rowid, value = db.execute("SELECT rowid, value FROM Cache LIMIT 1").fetchone()
    db.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bytes(value)[:-1] + b"!", rowid))
    db.commit()
    db.close()
    assert main(["cache", "prune", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "removed 0 expired, 1 bad and 0 evicted entries (policy least-recently-used); 5 left" in out
    assert main(["cache", "prune", str(copy), "--max-bytes", "0"]) == 0
    assert "0 left" in capsys.readouterr().out
    assert main(["cache", "clear", str(copy)]) == 0
    assert "removed 0 entries" in capsys.readouterr().out


def test_clear_and_bad_folders(tmp_path, folders, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders / "inference", copy)
    assert main(["cache", "clear", str(copy)]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert main(["cache", "stats", str(copy)]) == 0
    assert "entries: 0," in capsys.readouterr().out
    assert main(["cache", "stats", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    assert main(["cache", "ls", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["cache", "ls", str(tmp_path / "empty")]) == 2
    assert "is not an hf_neuralcache cache folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["cache", "stats", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script",
    ["prefix_cache.py", "inference_cache.py", "semantic_cache.py", "paged_kv.py", "tensor_cache.py", "sliding_window.py"],  # noqa: E501
)
def test_examples_run(script):
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / script
    # FutureWarning as an error, and no deprecation logged: the examples use the installed transformers' names
    command = [sys.executable, "-W", "error::FutureWarning", str(path), "--tiny"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "past_key_values" not in result.stderr and "deprecated" not in result.stderr, result.stderr
    if script == "prefix_cache.py":
        assert result.stdout.count("identical to generating without the cache: True") == 3
        assert "'hits': 2" in result.stdout
    elif script == "semantic_cache.py":  # paraphrases served, look-alikes and the time-dependent question not
        served = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if "[cache]" in line]
        assert served == ["What's the capital city of France?", "How can I reverse a Python list?"]
        assert "'hits': 2," in result.stdout and "'not_cacheable': 1," in result.stdout
    elif script == "sliding_window.py":
        assert "tokens (before the window is exceeded) agree: True" in result.stdout
    elif script == "paged_kv.py":
        assert "identical to DynamicCache: True" in result.stdout
    elif script == "tensor_cache.py":  # three caches generated; the bounded ones hold fewer bytes than full KV
        held = dict(re.findall(r"^(\w+) \(\d+ tokens, ([\d,]+) bytes held\)", result.stdout, re.MULTILINE))
        assert sorted(held) == ["dynamic", "sliding_window_kv", "tensor_cache"]
        sizes = {name: int(value.replace(",", "")) for name, value in held.items()}
        assert sizes["sliding_window_kv"] < sizes["tensor_cache"] < sizes["dynamic"]
        assert "tensor_cache: first token differing from full KV:" in result.stdout
    else:
        assert "'hits': 2, 'misses': 2" in result.stdout


def test_tensor_cache_example_fits_and_uses_a_learned_memory():
    """examples/tensor_cache.py --tiny --learned fit: a small memory is fitted, then generate runs with it."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "tensor_cache.py"
    command = [sys.executable, str(path), "--tiny", "--learned", "fit", "--retain", "0", "--max-new-tokens", "24"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^fitted a learned memory for 2 layers in \d+ s$", result.stdout, re.MULTILINE), result.stdout
    held = dict(re.findall(r"^([\w ]+) \(24 tokens, ([\d,]+) bytes held\)", result.stdout, re.MULTILINE))
    assert sorted(held) == ["dynamic", "sliding_window_kv", "tensor_cache", "tensor_cache learned"]
    assert "tensor_cache learned: first token differing from full KV:" in result.stdout
    refused = subprocess.run([sys.executable, str(path), "--learned", "fit"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--learned fit on SmolLM2 needs --text FILE" in refused.stderr


def test_shared_cache_example(redis_server):
    """examples/shared_cache.py: host B is served from host A's work through a real Redis, and says so without one."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "shared_cache.py"
    command = [sys.executable, "-W", "error::FutureWarning", str(path), "--tiny", "--redis-url", redis_server.url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "past_key_values" not in result.stderr and "deprecated" not in result.stderr, result.stderr
    assert result.stdout.count("identical to generating without the caches: True") == 3
    assert "host A, question 1: computed" in result.stdout
    assert "host B starts with an empty folder: 0 local entries" in result.stdout
    assert "host B, question 1: inference cache hit" in result.stdout
    assert "host B, question 2: prefix cache hit (256 prompt tokens' K/V loaded" in result.stdout
    assert "'storage_errors': 0" in result.stdout and "'storage_errors': 1" not in result.stdout
    assert redis_server.client().dbsize() == 0  # the example removed its namespace's entries

    redis_server.kill()  # no server: a clear message, status 0, nothing run
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"No Redis server reachable at {redis_server.url}" in result.stdout
