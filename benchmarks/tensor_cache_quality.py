"""tensor_cache quality on the embedded SmolLM2-135M (fp32): NLL and perplexity against the bytes each cache holds.

    python benchmarks/tensor_cache_quality.py --chunk 64                  # 4,096 tokens of Sherlock Holmes, every row
    python benchmarks/tensor_cache_quality.py --tokens 2048 --all        # quicker, plus every training-free variant
    python benchmarks/tensor_cache_quality.py --chunk 64 --text paws      # another kind of text (PAWS sentences)
    python benchmarks/tensor_cache_quality.py --chunk 64 --only "full,4 sinks,learned" \
        --learned 256=benchmarks/out/tc_w256 --learned 128=benchmarks/out/tc_w128 --learned 64=benchmarks/out/tc_w64

Fit the learned memory on Pride and Prejudice only (never on the evaluation text), one folder per window:

    hf-neuralcache tensor-cache fit --text ../shared/data/pride_and_prejudice.txt --window 256 \
        --out benchmarks/out/tc_w256

Rows: the full KV cache; sinks + window (`sliding_window_kv`, 4 sinks + 64 / 128 / 256 / 1024, and 256 without
sinks); TOVA, TOVA (last query), H2O and SnapKV at 260 entries per layer and KV head (`eviction_baselines.py`: 4
sinks always kept, keys at their original positions, evicting to the budget after each chunk, so holding budget +
chunk entries during a forward); TOVA at 260 and 272 with a `moment` memory of what it evicts (retained tokens +
memory; 272 entries + the memory fill 30% of 4 + 1024's bytes); TOVA at 305 entries (30% of those bytes, no
memory), TOVA with a score carry at 302 (the carried score costs 4 bytes an entry), and with per-layer budgets
fitted on Pride and Prejudice (`fit_layer_budgets.py`, read from `data/layer_budgets_smollm2.json`) at 302, and at
270 with a `moment` memory; "TOVA oracle" at 272 and 302 entries, where each query sees its own top entries over the
full cache (a bound on any policy keeping that many, not a cache: its bytes are those the entries would take), and
"window 256 + oracle" at 276 and 308, where each query must also see its own last 256 positions (a bound on any
cache that keeps that window and 16 / 48 entries' worth of anything else);
tensor_cache training_free (`moment`) at W = 64, 128, 256 and paper (untrained) at 256; one "tensor_cache W{W}
learned" row per `--learned W=DIR`, and for a W = 256 fit, TOVA at 260 with that learned memory behind it and the
fit with 31 retained tokens (what fits beside it in 30% of 4 + 1024's bytes);
tensor_cache with retained tokens (`cache_config["retain"]`): a 64-token window, the moment memory and 205 retained
tokens, or 203 with a score carry of 0.5, or the fitted layer budgets (all within 30% of 4 + 1024's bytes), and with
`--retention DIR` every such row with the score's window and carry again, ranked by a fitted retention score
(`cache_config["retention"]`; fit it on Pride and Prejudice only: `hf-neuralcache tensor-cache fit-retention --text
../shared/data/pride_and_prejudice.txt --out DIR`, add `--window 256` for the learned W = 256 + retain 31 row).

Every row feeds the same text through its cache in prefill chunks of `--chunk` tokens (chunked prefill equals
token-by-token decoding for the sliding-window and tensor caches without retained tokens; for the eviction baselines
and retained tokens it is their rule at that granularity; `--decode-from N` feeds one token per forward from position
N on, as `generate` decodes) and averages the NLL of the tokens at positions >= `--score-from`. "bytes" is what the
cache holds at the end (`memory_bytes()`; for the full KV cache the keys and values of every token). Prints each row
as it finishes, then a table with the bytes as a share of 4 sinks + window 1024 and the share of the NLL gap between
4 sinks + window 256 and the full KV cache that each row wins back, and saves a PNG of NLL against bytes (below it,
the rows within 30% of 4 + 1024's bytes, ranked) and the rows as JSON beside it (`--replot JSON` redraws both).
`--only A,B` runs the rows whose label contains A or B; `--label LABEL` (repeatable) runs the row with exactly that
label, for labels with commas.

Texts (`--text`): `sherlock` and `pride` (the novels after their Gutenberg header), `paws` (the `sentence1` column
of `paws_wiki_dev.tsv`, each distinct sentence once in file order, joined with newlines: unrelated Wikipedia
sentences, another kind of text than a novel). `--model tiny` runs a 2-layer random model on the text's bytes (a
smoke test of the machinery; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eviction_baselines, next to this file
import eviction_baselines  # noqa: E402  (registers the "eviction_baseline" attention function)

import hf_neuralcache  # noqa: E402
from hf_neuralcache import CACHE_KWARG  # noqa: E402  ("cache" from transformers 5.24, else "past_key_values")
from hf_neuralcache.models import load_embedded_model, tiny_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXTS = {
    "sherlock": "adventures_of_sherlock_holmes.txt",
    "pride": "pride_and_prejudice.txt",
    "paws": "paws_wiki_dev.tsv",
}
LAYER_BUDGETS = Path(__file__).resolve().parent / "data" / "layer_budgets_smollm2.json"  # fit_layer_budgets.py
BUDGET = 260  # entries per layer and KV head of the eviction baselines: 4 sinks + 256

# (label, kind, config): kind None is the full KV cache, "eviction" a baseline of eviction_baselines.py (config:
# its policy and options), else a cache name of hf_neuralcache with its cache_config
ROWS = [
    ("full KV", None, {}),
    ("window 256, no sinks", "sliding_window_kv", {"window": 256, "sink_tokens": 0}),
    ("4 sinks + window 64", "sliding_window_kv", {"window": 64, "sink_tokens": 4}),
    ("4 sinks + window 128", "sliding_window_kv", {"window": 128, "sink_tokens": 4}),
    ("4 sinks + window 256", "sliding_window_kv", {"window": 256, "sink_tokens": 4}),
    ("4 sinks + window 1024", "sliding_window_kv", {"window": 1024, "sink_tokens": 4}),
    (f"TOVA @{BUDGET}", "eviction", {"policy": "tova"}),
    (f"TOVA last query @{BUDGET}", "eviction", {"policy": "tova_last"}),
    (f"H2O @{BUDGET}", "eviction", {"policy": "h2o"}),
    (f"SnapKV @{BUDGET}", "eviction", {"policy": "snapkv"}),
    (f"TOVA @{BUDGET} + moment memory", "eviction", {"policy": "tova", "memory": "moment"}),
    # the most entries that fit, with the moment memory, in 30% of 4 + 1024's bytes (the learned-memory issue's cap),
    # and beside a learned F = 16 memory (benchmarks/tova_memory_e2e.py); each also alone, to measure the memory
    ("TOVA @272", "eviction", {"policy": "tova", "budget": 272}),
    ("TOVA @272 + moment memory", "eviction", {"policy": "tova", "memory": "moment", "budget": 272}),
    ("TOVA @288", "eviction", {"policy": "tova", "budget": 288}),
    ("TOVA @305", "eviction", {"policy": "tova", "budget": 305}),
    ("TOVA carry 0.5 @302", "eviction", {"policy": "tova", "carry": 0.5, "budget": 302}),
    ("TOVA oracle @272 (a bound, not a cache)", "oracle", {"entries": 272}),
    ("TOVA oracle @302 (a bound, not a cache)", "oracle", {"entries": 302}),
    # the same bound for a cache that must keep 4 sinks + a 256-token window: each query also chooses 16 / 48 more
    # (the bytes of a learned F = 16 memory / all that 30% of 4 + 1024's bytes leaves beside that window)
    ("window 256 + oracle @276 (a bound, not a cache)", "oracle", {"entries": 276, "window": 256}),
    ("window 256 + oracle @308 (a bound, not a cache)", "oracle", {"entries": 308, "window": 256}),
    ("tensor_cache W64 training_free", "tensor_cache", {"window": 64}),
    ("tensor_cache W128 training_free", "tensor_cache", {"window": 128}),
    ("tensor_cache W256 training_free", "tensor_cache", {"window": 256}),
    ("tensor_cache W256 paper (untrained)", "tensor_cache", {"window": 256, "mode": "paper"}),
    # retained tokens (cache_config["retain"]): the most that fit beside window and moment memory in 30% of
    # 4 + 1024's bytes; chosen on the held-out part of Pride and Prejudice (--text pride --offset 8192), not here
    ("tensor_cache W64 + retain 205", "tensor_cache", {"window": 64, "retain": 205}),
    ("tensor_cache W64 + retain 203, carry 0.5", "tensor_cache", {"window": 64, "retain": 203, "carry": 0.5}),
]
VARIANTS = [  # the training-free candidates measured for docs/tensor_cache.md
    (f"tensor_cache W256 {memory} decay {decay}", "tensor_cache", {"window": 256, "memory": memory, "decay": decay})
    for memory in ("mean", "moment", "gaussian")
    for decay in (1.0, 0.999, 0.99)
] + [("tensor_cache W256 paper outer (untrained)", "tensor_cache", {"window": 256, "mode": "paper", "rule": "outer"})]
REFERENCE = "4 sinks + window 1024"  # bytes are reported as a share of its bytes
GAP = ("4 sinks + window 256", "full KV")  # the NLL gap a row wins back: (low end, high end)


def read_text(name: str) -> str:
    path = DATA / TEXTS[name]
    if name == "paws":
        lines = path.read_text(encoding="utf-8").splitlines()[1:]  # header: id, sentence1, sentence2, label
        return "\n".join(dict.fromkeys(line.split("\t")[1] for line in lines if line.strip()))
    return path.read_text(encoding="utf-8-sig").split("\n", 60)[-1]  # skip the Project Gutenberg header


def text_ids(tokenizer, name: str, tokens: int, vocab: int | None = None, offset: int = 0) -> torch.Tensor:
    """`tokens` token ids of the text from token `offset`; without a tokenizer its bytes (clipped into a tiny
    vocabulary)."""
    text = read_text(name)
    if tokenizer is None:
        ids = (torch.tensor(list(text.encode()[offset : offset + tokens])) % (vocab - 3) + 3).unsqueeze(0)
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, offset : offset + tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"{TEXTS[name]} has {ids.shape[1]} tokens, expected at least {tokens}.")
    return ids


def learned_rows(model, values: list[str]) -> list:
    """Rows of `--learned W=DIR` (or the older `DIR[,DIR...]`): the fitted params, checked against the model."""
    rows = []
    for value in values:
        for item in filter(None, value.split(",")):
            window, sep, folder = item.partition("=")
            if not sep:
                window, folder = None, item
            params = hf_neuralcache.TensorCacheParams.from_pretrained(folder)
            if window is not None and int(window) != params.window:
                raise SystemExit(f"--learned {item}: {folder} was fitted for window {params.window}, not {window}")
            params.check(model=model)  # fitted for these weights (generate checks this; create_cache does not)
            config = {"mode": "learned", "params": params, "window": params.window, "sink_tokens": params.sink_tokens}
            rows.append((f"tensor_cache W{params.window} learned", "tensor_cache", config))
            if params.window + params.sink_tokens == BUDGET:  # the same entries: TOVA's retained tokens + this memory
                rows.append((f"TOVA @{BUDGET} + learned memory (W{params.window} fit)", "eviction",
                             {"policy": "tova", "memory": params}))  # fmt: skip
                # the issue's configuration with retained tokens: what fits beside it in 30% of 4 + 1024's bytes
                rows.append((f"tensor_cache W{params.window} learned + retain 31, carry 0.5", "tensor_cache",
                             {**config, "retain": 31, "carry": 0.5}))  # fmt: skip
    return rows


def fitted_rows(model, path: Path = LAYER_BUDGETS) -> list:
    """Rows with the per-layer budgets that `fit_layer_budgets.py` fitted on Pride and Prejudice (if for this model)."""
    if not path.is_file():
        return []
    fit = json.loads(path.read_text(encoding="utf-8"))
    increments = fit["increments"]
    if len(increments) != model.config.num_hidden_layers:
        return []  # fitted for another model (the tiny smoke-test model)
    carry, heads = fit["carry"], model.config.num_key_value_heads
    # per layer given more entries: the KV head that did best with all of them (fit_layer_budgets.py --heads)
    choice = {int(layer): head for layer, head in fit.get("head_choice", {}).items()}

    def budgets(mean: int, per_head: bool) -> list:
        return eviction_baselines.layer_budgets(increments, mean, choice if per_head else None, heads)

    rows = []
    for per_head in (False, True) if choice else (False,):
        label = f"TOVA carry {carry}, fitted {'layer + head' if per_head else 'layer'} budgets"
        rows += [
            (f"{label} @{fit['mean']}", "eviction",
             {"policy": "tova", "carry": carry, "budget": budgets(fit["mean"], per_head)}),
            (f"{label} @270 + moment memory", "eviction",
             {"policy": "tova", "carry": carry, "memory": "moment", "budget": budgets(270, per_head)}),
        ]  # fmt: skip
    # the same layer budgets in tensor_cache: a 64-token window, the rest of each layer's budget retained (mean 271
    # entries with the 4 sinks and the window: what fits beside the moment memory and the carried scores in 30%)
    retain = [budget - 4 - 64 for budget in budgets(271, False)]
    rows.append((f"tensor_cache W64 + retain fitted layer budgets, carry {carry}", "tensor_cache",
                 {"window": 64, "retain": retain, "carry": carry}))  # fmt: skip
    return rows


def retention_rows(model, rows: list, folders: list[str]) -> list:
    """For each `--retention DIR`: every tensor_cache row with retained tokens and that score's window and carry,
    again, ranked by the fitted score."""
    extra = []
    for folder in folders:
        params = hf_neuralcache.RetentionParams.from_pretrained(folder)
        params.check(model=model)  # fitted for these weights (generate checks this; create_cache does not)
        for label, kind, config in rows:
            if kind == "tensor_cache" and config.get("retain") and config["window"] == params.window \
                    and float(config.get("carry", 0.0)) == params.carry:  # fmt: skip
                extra.append((f"{label}, fitted retention", kind, {**config, "retention": params}))
    return extra


def oracle_bytes(model, entries: int) -> int:
    """What `entries` keys and values (and an int64 position) per layer and KV head would hold."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per = 2 * dim * next(model.parameters()).element_size() + 8
    return entries * text.num_hidden_layers * heads * per


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def make_cache(model, kind: str | None, config: dict):
    if kind in (None, "oracle"):
        return DynamicCache(config=model.config)
    if kind == "eviction":
        options = dict(config)
        return eviction_baselines.EvictionCache(model.config, options.pop("policy"), options.pop("budget", BUDGET),
                                                **options)  # fmt: skip
    return hf_neuralcache.create_cache(kind, model.config, **config)


def select_rows(rows: list, only: str = "", labels: list[str] = ()) -> list:
    """The rows to run: every row if neither is given, else those whose label has one of the comma-separated
    substrings `only` or is one of `labels` (each must name a row)."""
    known = {row[0] for row in rows}
    missing = [label for label in labels if label not in known]
    if missing:
        raise SystemExit(f"--label {missing[0]!r} names no row; the rows are: {sorted(known)}")
    if not only and not labels:
        return rows
    parts = [part for part in only.split(",") if part]
    return [row for row in rows if row[0] in labels or any(part in row[0] for part in parts)]


def spans(length: int, chunk: int, decode_from: int | None = None) -> list[tuple[int, int]]:
    """`(begin, end)` of each forward: chunks of `chunk` tokens, and from `decode_from` on one token per forward (as
    `generate` decodes; the chunks stop there)."""
    cut = length if decode_from is None else min(decode_from, length)
    chunks = [(begin, min(begin + chunk, cut)) for begin in range(0, cut, chunk)]
    return chunks + [(begin, begin + 1) for begin in range(cut, length)]


def evaluate(model, ids: torch.Tensor, kind: str | None, config: dict, chunk: int, score_from: int,
             decode_from: int | None = None):  # fmt: skip
    """`(nll, bytes held, seconds)` of feeding `ids` through the cache in chunks (one token per forward from
    `decode_from`)."""
    cache = make_cache(model, kind, config)
    attention = model.config._attn_implementation
    if kind == "eviction":  # the baselines need the attention weights: their own (eager) attention function
        model.set_attn_implementation(eviction_baselines.ATTENTION)
    elif kind == "oracle":  # every key held; each query sees its own top entries (a bound, not a cache)
        oracle = eviction_baselines.oracle_attention(config["entries"], window=config.get("window", 0))
        model.set_attn_implementation(oracle)
    start, nll, count = time.perf_counter(), 0.0, 0
    try:
        with torch.no_grad():
            for begin, end in spans(ids.shape[1], chunk, decode_from):
                piece = ids[:, begin:end]
                logits = model(piece, **{CACHE_KWARG: cache}).logits.float()
                targets = ids[:, begin + 1 : begin + 1 + piece.shape[1]]  # the next token of each position
                logits = logits[:, : targets.shape[1]]
                positions = torch.arange(begin + 1, begin + 1 + targets.shape[1])
                scored = positions >= score_from
                if scored.any():
                    losses = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
                    nll += losses[scored].sum().item()
                    count += int(scored.sum())
    finally:
        model.set_attn_implementation(attention)
    if kind == "oracle":
        held = oracle_bytes(model, config["entries"])
    else:
        held = dynamic_bytes(cache) if kind is None else cache.memory_bytes()
    return nll / count, held, time.perf_counter() - start


def table(results: list[tuple[str, float, int, float]]) -> list[str]:
    """The markdown table: NLL, ppl, bytes, bytes as % of 4 + 1024, share of the 4 + 256 -> full gap won back."""
    by_label = {label: (nll, held) for label, nll, held, _ in results}
    reference = by_label.get(REFERENCE, (None, None))[1]
    low, high = (by_label.get(label, (None,))[0] for label in GAP)
    lines = [
        "| cache | NLL | ppl | bytes held | % of 4+1024 | gap recovered | s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, nll, held, seconds in results:
        share = f"{100 * held / reference:.1f}%" if reference else ""
        gap = f"{(low - nll) / (low - high):+.2f}" if low is not None and high is not None and low != high else ""
        lines.append(f"| {label} | {nll:.4f} | {math.exp(nll):.3f} | {held:,} | {share} | {gap} | {seconds:.0f} |")
    return lines


def plot(results, path: str, title: str, score_from: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # top: every row against its bytes, its legend to the right; below: the rows within the goal's byte cap, ranked
    # (the top chart crowds them into one corner)
    fig = plt.figure(figsize=(13, 13))
    ax = fig.add_axes((0.07, 0.55, 0.52, 0.41))
    ranked = fig.add_axes((0.45, 0.04, 0.52, 0.43))
    families = {  # label pattern -> (family, marker); families of several rows are drawn as a line
        r"^4 sinks \+ window": ("4 sinks + window (64, 128, 256, 1024)", "o"),
        r"^tensor_cache W\d+ learned$": ("tensor_cache learned (W = 64, 128, 256)", "*"),
        r"^tensor_cache W\d+ training_free$": ("tensor_cache training_free (W = 64, 128, 256)", "P"),
    }
    lines: dict[str, list] = {}
    markers = {"oracle": "d", "fitted": "h", "TOVA": "v", "H2O": "^", "SnapKV": "D", "training_free": "P",
               "paper": "X", "full": "s", "no sinks": "x"}  # fmt: skip  (the first key in a label decides)
    # rows far above the rest (the untrained paper mode, a window without sinks) would flatten the chart: the y axis
    # stops a little above the 4 + 64 row (or the worst row when there is none), and those rows are named instead
    top = max((nll for label, nll, _, _ in results if label == "4 sinks + window 64"), default=None)
    top = max(nll for _, nll, _, _ in results) if top is None else top + 0.02
    off = [f"{label} ({nll:.3f})" for label, nll, _, _ in results if nll > top]
    for label, nll, held, _ in results:
        if nll > top:
            continue
        family = next((f for pattern, f in families.items() if re.search(pattern, label)), None)
        if family is not None:
            lines.setdefault(family, []).append((held, nll, label))
            continue
        marker = next((m for key, m in markers.items() if key in label), "o")
        ax.scatter(held, nll, marker=marker, s=50, label=label, zorder=3)
    for (name, marker), points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, markersize=9, label=name, zorder=2)
        for held, nll, label in points:
            short = label.replace("4 sinks + window ", "4+").replace("tensor_cache ", "").split(" ")[0]
            ax.annotate(short, (held, nll), fontsize=7, xytext=(4, 4), textcoords="offset points")
    reference = next(((nll, held) for label, nll, held, _ in results if label == REFERENCE), None)
    if reference is not None:  # the issue's goal: within 0.005 of 4 + 1024's NLL at <= 30% of its bytes
        ax.axhline(reference[0] + 0.005, color="grey", linestyle="--", linewidth=0.8, label=f"{REFERENCE} + 0.005")
        ax.axvline(0.3 * reference[1], color="grey", linestyle=":", linewidth=0.8, label=f"30% of {REFERENCE}'s bytes")
        rank_rows(ranked, results, reference)
    else:
        ranked.set_visible(False)
    if off:
        ax.set_ylim(top=top)
        ax.text(0.01, 0.01, "off the chart: " + ", ".join(off), transform=ax.transAxes, fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("bytes held at the end (log)")
    ax.set_ylabel(f"NLL, tokens >= {score_from}")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=130)
    print(f"saved {path}")


def rank_rows(ax, results, reference: tuple[float, int], cap: float = 0.3, slack: float = 0.01) -> None:
    """The rows holding at most `cap` (+ `slack`) of the reference's bytes, best NLL at the top, beside the reference
    and the goal (its NLL + 0.005); bounds (oracle rows) grey, `tensor_cache` rows blue, other caches orange."""
    right = reference[0] + 0.08  # rows worse than this are left out (the window alone, untrained modes)
    within = [(nll, label, held) for label, nll, held, _ in results if held <= (cap + slack) * reference[1]]
    rows = sorted([row for row in within if row[0] <= right] + [(reference[0], REFERENCE, reference[1])], reverse=True)
    for y, (nll, label, _) in enumerate(rows):
        color = "grey" if "oracle" in label else "tab:blue" if label.startswith("tensor_cache") else "tab:orange"
        color = "black" if label == REFERENCE else color
        ax.plot([nll], [y], marker="o", color=color, markersize=6)
        ax.annotate(f"{nll:.4f}", (nll, y), fontsize=6, xytext=(4, -2), textcoords="offset points")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{label} ({held / reference[1]:.1%})" for _, label, held in rows], fontsize=6)
    ax.axvline(reference[0] + 0.005, color="grey", linestyle="--", linewidth=0.8)
    low = min(nll for nll, _, _ in rows)
    ax.set_xlim(low - 0.005, max(reference[0] + 0.01, rows[0][0]) + 0.01)
    ax.set_xlabel(f"NLL (dashed: {REFERENCE} + 0.005; rows above {right:.3f} left out)")
    ax.set_title(f"rows within {cap:.0%} of {REFERENCE}'s bytes (share in brackets); grey: bounds", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text (default 4096)")
    parser.add_argument("--score-from", type=int, default=1024, help="first scored token position (default 1024)")
    parser.add_argument("--text", choices=sorted(TEXTS), default="sherlock", help="which text (default sherlock)")
    parser.add_argument("--offset", type=int, default=0,
                        help="first token of the text (default 0; `--text pride --offset 8192` is the held-out part "
                             "of the training book that the fitted settings were checked on)")  # fmt: skip
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk size (default 512; the issue: 64)")
    parser.add_argument("--decode-from", type=int, default=None,
                        help="from this position on, one token per forward, as generate decodes (default: chunks "
                             "to the end); `--decode-from 1024` decodes every scored token")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="also every training-free variant (memory x decay)")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only the rows whose label has one")
    parser.add_argument("--label", action="append", default=[],
                        help="run the row with exactly this label (repeatable; for labels with commas, which --only "
                             "splits on)")  # fmt: skip
    parser.add_argument("--learned", action="append", default=[], metavar="W=DIR",
                        help="a fitted TensorCacheParams folder and its window (repeatable; DIR[,DIR] also taken)")
    parser.add_argument("--retention", action="append", default=[], metavar="DIR",
                        help="a fitted RetentionParams folder (hf-neuralcache tensor-cache fit-retention; repeatable): "
                             "every retain row with its window and carry again, ranked by it")  # fmt: skip
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                        help="tiny: a random 2-layer model on the text's bytes (smoke test)")  # fmt: skip
    parser.add_argument("--plot", default="benchmarks/out/tensor_cache_quality.png",
                        help="PNG path ('' for none); the rows are saved beside it as JSON (same name, .json)")
    parser.add_argument("--replot", metavar="JSON", help="print the table and draw the PNG of a saved run; run nothing")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text(encoding="utf-8"))
        results = [(row["label"], row["nll"], row["bytes"], row["seconds"]) for row in saved["rows"]]
        print("\n".join(table(results)), flush=True)
        if args.plot:
            plot(results, args.plot, saved["title"], saved["score_from"])
        return

    if args.model == "tiny":
        model, tokenizer = tiny_model("llama", attn_implementation="neuralcache"), None
    else:
        model, tokenizer = load_embedded_model(attn_implementation="neuralcache")
    ids = text_ids(tokenizer, args.text, args.tokens, model.config.vocab_size, args.offset)
    rows = ROWS + fitted_rows(model) + (VARIANTS if args.all else []) + learned_rows(model, args.learned)
    rows += retention_rows(model, rows, args.retention)
    rows = select_rows(rows, args.only, args.label)
    name = "SmolLM2-135M fp32" if args.model == "smollm2" else "tiny random llama (smoke test)"
    start = f" from token {args.offset}" if args.offset else ""
    title = (
        f"{name}, {args.tokens} tokens of {TEXTS[args.text]}{start}, NLL over tokens >= {args.score_from}, "
        f"prefill chunks of {args.chunk}"
        + (f", one token per forward from {args.decode_from}" if args.decode_from is not None else "")
    )
    print(f"== {title}", flush=True)
    results = []
    for label, kind, config in rows:
        nll, held, seconds = evaluate(model, ids, kind, config, args.chunk, args.score_from, args.decode_from)
        print(f"  {label:42s} | {nll:6.4f} | {math.exp(nll):9.3f} | {held:12,} | {seconds:5.0f} s", flush=True)
        results.append((label, nll, held, seconds))
    print()
    print("\n".join(table(results)), flush=True)
    if args.plot:
        rows = [dict(zip(("label", "nll", "bytes", "seconds"), result, strict=True)) for result in results]
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        Path(args.plot).with_suffix(".json").write_text(
            json.dumps({"title": title, "score_from": args.score_from, "rows": rows}, indent=1), encoding="utf-8"
        )
        plot(results, args.plot, title, args.score_from)


if __name__ == "__main__":
    main()
