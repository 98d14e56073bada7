"""Fit per-layer TOVA budgets on Pride and Prejudice: which layers get more entries within the same bytes.

    python benchmarks/fit_layer_budgets.py            # ~8 minutes on 2 CPU cores; writes the JSON below
    python benchmarks/fit_layer_budgets.py --reuse --heads   # then the per-head choice (~5 more minutes)

A bounded cache of `mean` entries per layer and KV head spends them the same way in every layer. Layers do not need
them equally: on SmolLM2 giving one layer 256 more entries lowers the NLL by up to 0.003 nats, and not at all in
most layers. This script measures that, once, on the training text only (the first `--tokens` tokens of *Pride and
Prejudice*, NLL over positions >= 1,024, chunks of 64), with the eviction policy the budgets are for (TOVA with
`--carry`):

1. the NLL with `mean` entries in every layer;
2. for each layer `i`, the NLL with `mean + 256` entries in layer `i` and `mean` elsewhere: `gain[i]` is the drop;
3. the layers whose gain is at least `--major` (0.002 nats) get 256 more entries than the rest, those with at least
   `--minor` (0.0009) 128 more, and the other layers pay for them equally (`eviction_baselines.layer_budgets`), so
   the mean stays `mean` and the bytes stay those of a uniform budget.

With `--heads` (add `--reuse` to keep the layer sweep already in the JSON), each layer given more entries is then
tried with all of its extra entries on one KV head (3 heads: `mean - extra` on two heads, `mean + 2 extra` on the
third), and the head that lowers the NLL most, if any does better than spreading them, is recorded; the
"fitted layer + head budgets" rows use it.

The thresholds were set by looking at the gains on this text (no other text was read); the result was then checked
once on a held-out part of the same book (tokens 8,192-12,288) before any evaluation text. Output:
`benchmarks/data/layer_budgets_smollm2.json` (gains, increments, settings, seconds), read by
`tensor_cache_quality.py`'s "fitted layer budgets" rows. No gradient, no backward: 31 forward passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eviction_baselines  # noqa: E402
import tensor_cache_quality as quality  # noqa: E402

from hf_neuralcache.hooks.fingerprint import model_fingerprint  # noqa: E402
from hf_neuralcache.models import load_embedded_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "layer_budgets_smollm2.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mean", type=int, default=302, help="mean entries per layer and KV head (default 302)")
    parser.add_argument("--carry", type=float, default=0.5, help="TOVA score carry (default 0.5)")
    parser.add_argument("--step", type=int, default=256, help="entries added to one layer to measure it (256)")
    parser.add_argument("--major", type=float, default=0.002, help="gain for +256 entries (default 0.002 nats)")
    parser.add_argument("--minor", type=float, default=0.0009, help="gain for +128 entries (default 0.0009)")
    parser.add_argument("--tokens", type=int, default=4096, help="training tokens (default 4096)")
    parser.add_argument("--heads", action="store_true",
                        help="then, in each layer given more, try all its extra entries on one KV head")  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="take the layer sweep from --out (same settings)")
    parser.add_argument("--out", default=str(OUT), help="JSON path")
    args = parser.parse_args(argv)

    model, tokenizer = load_embedded_model(attn_implementation="neuralcache")
    ids = quality.text_ids(tokenizer, "pride", args.tokens)
    layers = model.config.num_hidden_layers
    start = time.perf_counter()

    def nll(budgets):
        config = {"policy": "tova", "carry": args.carry, "budget": budgets}
        return quality.evaluate(model, ids, "eviction", config, 64, 1024)[0]

    previous = json.loads(Path(args.out).read_text(encoding="utf-8")) if args.reuse else None
    if previous is not None:  # the layer sweep of an earlier run with these settings
        settings = {"model": model_fingerprint(model), "mean": args.mean, "carry": args.carry, "step": args.step}
        if any(previous[key] != value for key, value in settings.items()):
            raise SystemExit(f"{args.out} was fitted with other settings than {settings}")
        base, gains, start = previous["base_nll"], previous["gains"], start - previous["seconds"]
    else:
        base = nll([args.mean] * layers)
        gains = []
        for layer in tqdm(range(layers), desc="layers"):
            budgets = [args.mean] * layers
            budgets[layer] += args.step
            gains.append(base - nll(budgets))
    increments = [256 if g >= args.major else 128 if g >= args.minor else 0 for g in gains]
    heads = model.config.num_key_value_heads
    head_gains, choice = {}, {}
    if args.heads:  # in each layer with more entries, try giving all of them to one KV head
        spread = nll(eviction_baselines.layer_budgets(increments, args.mean))
        for layer in tqdm([i for i, extra in enumerate(increments) if extra], desc="heads"):
            # > 0: better than spreading the layer's extra entries over its heads
            gains_here = {h: spread - nll(eviction_baselines.layer_budgets(increments, args.mean, {layer: h}, heads))
                          for h in range(heads)}  # fmt: skip
            head_gains[layer] = gains_here
            best = max(gains_here, key=gains_here.get)
            if gains_here[best] > 0:
                choice[layer] = best
    result = {
        "model": model_fingerprint(model),
        "text": quality.TEXTS["pride"],
        "tokens": args.tokens,
        "mean": args.mean,
        "carry": args.carry,
        "step": args.step,
        "thresholds": {"256": args.major, "128": args.minor},
        "base_nll": round(base, 5),
        "gains": [round(g, 5) for g in gains],
        "increments": increments,
        "head_gains": {str(i): {str(h): round(g, 5) for h, g in gains.items()} for i, gains in head_gains.items()},
        "head_choice": {str(layer): head for layer, head in choice.items()},
        "seconds": round(time.perf_counter() - start),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k not in ("gains", "head_gains")}))
    print("gains:", " ".join(f"{i}:{g:+.4f}" for i, g in enumerate(gains)))


if __name__ == "__main__":
    main()
