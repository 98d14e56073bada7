"""`benchmarks/redis_load.py` in its quick mode: 4 processes on one real Redis, killed and paused mid-run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from redis_helpers import ENABLE

ROOT = Path(__file__).resolve().parents[1]


def test_redis_load_quick(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip(ENABLE)
    pytest.importorskip("redis", reason=ENABLE)
    out = tmp_path / "redis_load.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "redis_load.py"), "--model", "tiny", "--requests", "12",
               "--down-seconds", "0.5", "--pause-seconds", "1", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["scenario"]: row for row in json.loads(out.read_text())["scenarios"]}
    assert list(rows) == ["normal", "kill+restart", "pause"]
    for name, row in rows.items():
        assert row["requests"] == 48, name
        assert row["errors"] == 0 and row["wrong"] == 0, (name, row["error_examples"])
    assert rows["normal"]["fault"] is None and rows["pause"]["fault"]["seconds"] >= 1
    assert rows["normal"]["inference_hit_rate"] > 0  # the pool repeats prompts
    assert rows["normal"]["prefix_hit_rate"] > 0  # and shares system prompts
    for name, row in rows.items():  # nothing is ever an integrity failure: the values in Redis are all good
        assert row["stats"]["inference_integrity_errors"] + row["stats"]["prefix_integrity_errors"] == 0, name
    assert "| scenario | requests | errors | wrong |" in result.stdout
