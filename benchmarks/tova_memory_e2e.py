"""Ablation: the learned memory behind TOVA's retained tokens, trained end to end on the LM loss (Pride only).

    python benchmarks/tova_memory_e2e.py --init DIR --budget 288 --steps 300 --lr 1e-3     # ~6 min on 2 idle cores

What the best memory behind attention-chosen retained tokens can add, as a bound for `fit_tensor_cache` (which fits
layer by layer and never back-propagates through the model; this does, so it is an experiment, not a fit to ship).
The memory is the `"learned"` mode's (Hedgehog feature maps, decay, write rate per layer), started from a
`fit_tensor_cache` folder (`--init`), written with what TOVA evicts (`eviction_baselines.EvictionCache(...,
memory=...)`). Training: 4,096-token segments of Pride and Prejudice (4 of them, cycled), fed in 64-token chunks;
once 512 tokens are in, each step runs two chunks with the memory state carried in but detached (truncated
back-propagation: the first chunk's evictions are written, the second reads them), takes the next-token loss of
both, and updates the memory parameters only (Adam); the model is frozen. Sherlock Holmes (4,096 tokens, NLL over
positions >= 1,024, as `tensor_cache_quality.py`) is evaluated every `--eval-every` steps and at the end; it is
never trained on, and the reported figure is the last one (choosing a step by it would tune on the evaluation text).
Layers the fit switched off start at `eta = exp(-5)` here.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eviction_baselines, tensor_cache_quality
import eviction_baselines as eb  # noqa: E402
import tensor_cache_quality as q  # noqa: E402
from hf_neuralcache.kernels.fast_weight.naive import LearnedMemory, LearnedState  # noqa: E402

from hf_neuralcache import CACHE_KWARG, TensorCacheParams  # noqa: E402
from hf_neuralcache.models import load_embedded_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True, help="a fit_tensor_cache folder (W = 256, 4 sinks) to start from")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--budget",
        type=int,
        default=288,
        help="TOVA entries per layer and KV head (288 + the F = 16 memory: 29.9%% of 4 + 1024's bytes)",
    )
    ap.add_argument("--out", default="benchmarks/out/tova_memory_e2e.safetensors")
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tok = load_embedded_model(attn_implementation="neuralcache")
    for p in model.parameters():
        p.requires_grad_(False)
    init = TensorCacheParams.from_pretrained(args.init)
    names = ("q_weight", "q_bias", "k_weight", "k_bias", "decay_logit", "write_log")
    layers = model.config.num_hidden_layers
    params = {
        (i, n): torch.nn.Parameter(init.tensors[f"layers.{i}.{n}"].float().clone())
        for i in range(layers)
        for n in names
    }
    # switched-off layers (write_log = -30) get a chance: start them where the others are
    for i in range(layers):
        if params[(i, "write_log")].max() < -20:
            params[(i, "write_log")].data.fill_(-5.0)
    opt = torch.optim.Adam(params.values(), lr=args.lr)

    def memory(i):
        g = lambda n: params[(i, n)]
        return LearnedMemory(
            g("q_weight"),
            g("q_bias"),
            g("k_weight"),
            g("k_bias"),
            torch.nn.functional.logsigmoid(g("decay_logit")),
            torch.exp(g("write_log")),
        )

    def new_cache():
        cache = eb.EvictionCache(model.config, "tova", args.budget)
        for i, layer in enumerate(cache.layers):
            layer.memory = memory(i)
        return cache

    text = q.read_text("pride")
    ids_all = tok(text, return_tensors="pt").input_ids
    segments = [ids_all[:, s : s + 4096] for s in range(0, 4 * 4096, 4096)]  # Pride only
    sher = q.text_ids(tok, "sherlock", 4096, model.config.vocab_size)

    class Fitted:  # what EvictionCache asks of fitted parameters: each layer's memory
        layer = staticmethod(memory)

    def evaluate():  # the quality benchmark's own loop and scoring, with TOVA + this memory
        config = {"policy": "tova", "budget": args.budget, "memory": Fitted()}
        return q.evaluate(model, sher, "eviction", config, chunk=64, score_from=1024)[0]

    def save():
        from safetensors.torch import save_file

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file({f"layers.{i}.{n}": p.detach().contiguous() for (i, n), p in params.items()}, args.out)

    model.set_attn_implementation(eb.ATTENTION)
    print("start sherlock", round(evaluate(), 4), flush=True)
    step, t0 = 0, time.time()
    while step < args.steps:
        for seg in segments:
            cache = new_cache()
            model.set_attn_implementation(eb.ATTENTION)
            b = 0
            run = 0.0
            while b + 128 <= seg.shape[1] and step < args.steps:
                # re-bind the memories (fresh graph) and detach the carried state
                for i, layer in enumerate(cache.layers):
                    layer.memory = memory(i)
                    if layer.state is not None:
                        layer.state = LearnedState(*(t.detach() for t in layer.state))
                    if layer.keys is not None:
                        layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
                piece = seg[:, b : b + 128]
                if b + 128 > 512:  # train once eviction is under way
                    out1 = model(piece[:, :64], **{CACHE_KWARG: cache}).logits
                    out2 = model(piece[:, 64:], **{CACHE_KWARG: cache}).logits
                    logits = torch.cat([out1, out2], 1)[:, :-1].float()
                    loss = torch.nn.functional.cross_entropy(logits[0], piece[0, 1:])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step += 1
                    run = loss.item() if run == 0 else 0.95 * run + 0.05 * loss.item()
                    if step % 10 == 0:
                        print(f"step {step} loss {run:.4f} {time.time() - t0:.0f}s", flush=True)
                    if step % args.eval_every == 0:
                        print("sherlock", step, round(evaluate(), 4), flush=True)
                        model.set_attn_implementation(eb.ATTENTION)
                        save()
                else:
                    with torch.no_grad():
                        model(piece[:, :64], **{CACHE_KWARG: cache})
                        model(piece[:, 64:], **{CACHE_KWARG: cache})
                b += 128
    save()
    print("final sherlock", round(evaluate(), 4), flush=True)


if __name__ == "__main__":
    main()
