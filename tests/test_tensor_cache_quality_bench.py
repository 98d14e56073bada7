"""benchmarks/tensor_cache_quality.py on the tiny random model (`--model tiny`): each kind of row, table and PNG."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_helpers import load_benchmark

import hf_neuralcache
from hf_neuralcache.models import tiny_model


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("tensor_cache_quality")


def test_smoke_tiny_model(bench, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    if not (bench.DATA / bench.TEXTS["paws"]).is_file():
        pytest.skip(f"shared data not found: {bench.DATA}")  # a checkout without ../shared beside it
    params = hf_neuralcache.TensorCacheParams.initial(tiny_model("llama"), window=16, sink_tokens=4, features=4)
    params.save_pretrained(tmp_path / "w16")
    w256 = hf_neuralcache.TensorCacheParams.initial(tiny_model("llama"), window=256, sink_tokens=4, features=4)
    w256.save_pretrained(tmp_path / "w256")
    only = "full,4 sinks + window 64,4 sinks + window 256,TOVA,H2O,SnapKV,window 256 + oracle,training_free,learned"
    bench.main(["--model", "tiny", "--text", "paws", "--tokens", "320", "--score-from", "64", "--chunk", "32",
                "--only", only, "--learned", f"16={tmp_path / 'w16'}", "--learned", f"256={tmp_path / 'w256'}",
                "--plot", str(tmp_path / "q.png")])  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| cache")]
    labels = [row.split(" | ")[0][2:] for row in rows]
    assert labels == [
        "full KV", "4 sinks + window 64", "4 sinks + window 256", "TOVA @260", "TOVA last query @260", "H2O @260",
        "SnapKV @260", "TOVA @260 + moment memory", "TOVA @272", "TOVA @272 + moment memory", "TOVA @288",
        "TOVA @305", "TOVA carry 0.5 @302", "TOVA oracle @272 (a bound, not a cache)",
        "TOVA oracle @302 (a bound, not a cache)", "window 256 + oracle @276 (a bound, not a cache)",
        "window 256 + oracle @308 (a bound, not a cache)",  # no fitted layer budgets: they are for SmolLM2's 30 layers
        "tensor_cache W64 training_free",
        "tensor_cache W128 training_free", "tensor_cache W256 training_free", "tensor_cache W16 learned",
        "tensor_cache W256 learned", "TOVA @260 + learned memory (W256 fit)",  # only a W + sinks = 260 fit has it
        "tensor_cache W256 learned + retain 31, carry 0.5",  # and the retained tokens that fit beside it
    ]  # fmt: skip
    full = rows[0].split(" | ")
    assert full[-2] == "+1.00"  # the full KV cache wins back the whole gap (320 tokens: 4 + 256 evicts)
    assert (tmp_path / "q.png").stat().st_size > 0
    saved = json.loads((tmp_path / "q.json").read_text())  # the rows, to redraw without running them again
    assert [row["label"] for row in saved["rows"]] == labels
    (tmp_path / "q.png").unlink()
    bench.main(["--replot", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:] == rows
    assert (tmp_path / "q.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="fitted for window 16, not 32"):
        bench.main(["--model", "tiny", "--learned", f"32={tmp_path / 'w16'}", "--plot", ""])


def test_fitted_rows_read_the_layer_and_head_budgets(bench, tmp_path):
    """The fitted rows spread fit_layer_budgets.py's increments over the mean, and give a layer's extra entries to
    the KV head that did best with them (when one did better than spreading them)."""
    model = tiny_model("llama")  # 2 layers, 2 KV heads
    fit = {"mean": 200, "carry": 0.5, "increments": [128, 0], "head_choice": {"0": 1}}
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps(fit))
    rows = {label: config for label, _, config in bench.fitted_rows(model, path)}
    assert rows["TOVA carry 0.5, fitted layer budgets @200"]["budget"] == [328, 72]
    assert rows["TOVA carry 0.5, fitted layer budgets @270 + moment memory"]["budget"] == [398, 142]
    assert rows["TOVA carry 0.5, fitted layer + head budgets @200"]["budget"] == [[200, 456], 72]
    assert rows["TOVA carry 0.5, fitted layer + head budgets @270 + moment memory"]["memory"] == "moment"
    # tensor_cache: a 64-token window, the rest of each layer's budget (mean 271) retained
    retained = rows["tensor_cache W64 + retain fitted layer budgets, carry 0.5"]
    assert retained == {"window": 64, "retain": [399 - 68, 143 - 68], "carry": 0.5}
    fit["head_choice"] = {}  # no head did better than spreading: no per-head rows
    path.write_text(json.dumps(fit))
    assert [label for label, _, _ in bench.fitted_rows(model, path)] == [
        "TOVA carry 0.5, fitted layer budgets @200", "TOVA carry 0.5, fitted layer budgets @270 + moment memory",
        "tensor_cache W64 + retain fitted layer budgets, carry 0.5"]
    fit["increments"] = [0, 0, 128]  # fitted for another model
    path.write_text(json.dumps(fit))
    assert bench.fitted_rows(model, path) == []
    assert bench.fitted_rows(model, tmp_path / "missing.json") == []


def test_retention_rows_repeat_the_retain_rows_of_the_scores_window_and_carry(bench, tmp_path):
    from hf_neuralcache.caches.retention_fit import RetentionParams
    from hf_neuralcache.caches.tensor_cache_params import config_signature
    from hf_neuralcache.hooks.fingerprint import model_fingerprint

    model = tiny_model("llama")
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    weights = {i: torch.zeros(heads, dim // 2 + 4) for i in range(2)}
    params = RetentionParams(weights, 64, 64, 0.5, 2048, model_fingerprint(model), config_signature(model.config))
    params.save_pretrained(tmp_path / "ret")
    rows = [
        ("a", "tensor_cache", {"window": 64, "retain": 5, "carry": 0.5}),
        ("b", "tensor_cache", {"window": 64, "retain": 5}),  # another carry
        ("c", "tensor_cache", {"window": 256, "retain": 5, "carry": 0.5}),  # another window
        ("d", "tensor_cache", {"window": 64}),  # no retained tokens
        ("e", "eviction", {"window": 64, "retain": 5, "carry": 0.5}),
    ]
    extra = bench.retention_rows(model, rows, [str(tmp_path / "ret")])
    assert [(label, config["retain"]) for label, _, config in extra] == [("a, fitted retention", 5)]
    assert isinstance(extra[0][2]["retention"], RetentionParams)
    with pytest.raises(ValueError, match="fingerprint"):
        bench.retention_rows(tiny_model("llama", seed=1), rows, [str(tmp_path / "ret")])


def test_rows_are_chosen_by_substring_or_by_exact_label(bench):
    rows = [("TOVA @305", "eviction", {}), ("TOVA carry 0.5 @302", "eviction", {}), ("x, fitted retention", "t", {})]
    assert bench.select_rows(rows) == rows
    assert [row[0] for row in bench.select_rows(rows, "TOVA")] == ["TOVA @305", "TOVA carry 0.5 @302"]
    assert [row[0] for row in bench.select_rows(rows, "", ["x, fitted retention"])] == ["x, fitted retention"]
    assert [row[0] for row in bench.select_rows(rows, "@305", ["x, fitted retention"])] == [
        "TOVA @305", "x, fitted retention"]  # fmt: skip
    with pytest.raises(SystemExit, match="names no row"):
        bench.select_rows(rows, "", ["x"])


def test_decode_from_feeds_one_token_per_forward(bench):
    """`--decode-from N`: chunks up to N, then one token per forward; for caches whose chunked prefill equals
    token-by-token decoding the NLL is the same, and for retained tokens the choice follows the forwards."""
    assert bench.spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert bench.spans(10, 4, 6) == [(0, 4), (4, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
    assert bench.spans(10, 4, 0) == [(b, b + 1) for b in range(10)]
    assert bench.spans(10, 4, 20) == bench.spans(10, 4)
    torch.manual_seed(0)
    model = tiny_model("llama", attn_implementation="neuralcache")
    ids = torch.randint(3, model.config.vocab_size, (1, 72))
    for kind, config in (("sliding_window_kv", {"window": 16, "sink_tokens": 2}),
                         ("tensor_cache", {"window": 16, "sink_tokens": 2})):  # fmt: skip
        chunked = bench.evaluate(model, ids, kind, config, 24, 32)[0]
        decoded = bench.evaluate(model, ids, kind, config, 24, 32, decode_from=30)[0]
        assert abs(chunked - decoded) < 1e-4, (kind, chunked, decoded)
    config = {"window": 8, "sink_tokens": 2, "retain": 6, "carry": 0.5}
    chunked = bench.evaluate(model, ids, "tensor_cache", config, 24, 32)[0]
    decoded = bench.evaluate(model, ids, "tensor_cache", config, 24, 32, decode_from=30)[0]
    assert chunked != decoded  # the pool chooses once per forward: other forwards, other tokens kept
