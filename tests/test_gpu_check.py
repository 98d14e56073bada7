"""`benchmarks/gpu_check.py` on a machine without CUDA: its dry run covers every section and writes both files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "p1_paged_decode",
    "p7_tensor_cache_decode",
    "correctness",
    "p2_beam_search",
    "prefix_cache",
    "pytest_gpu",
    "p3_compiled_decode",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, `make gpu-check` runs the real thing")
def test_gpu_check_dry_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No CUDA GPU here" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert list(report["sections"]) == SECTIONS
    for name, result in report["sections"].items():
        assert result["status"] == "ok", (name, result.get("error"))
        assert {"summary", "goal", "met", "value", "data"} <= set(result), name
    assert report["sections"]["correctness"]["met"] is True  # the interpreted kernels give the reference's tokens
    p3 = report["sections"]["p3_compiled_decode"]
    assert "tensor_cache_learned" in p3["data"] and "learned/training_free" in p3["summary"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "**Dry run**" in table and "| check | result | goal | met | status | s |" in table
    for name in SECTIONS:
        assert f"\n| {name} | " in table
