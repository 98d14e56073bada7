"""Kernel speed of tensor_cache and the window caches: the fused decode step against window-only attention, and
our window kernel against SDPA on the same keys and values.

    python benchmarks/tensor_cache_speed.py --device cuda                  # a GPU: the compiled Triton kernels
    python benchmarks/tensor_cache_speed.py --device cpu                   # smoke run: the PyTorch reference path
    python benchmarks/tensor_cache_speed.py --device cpu --interpret       # smoke run through Triton's interpreter

Decode (one query per sequence, Llama-1B-like heads by default: 32 query heads, 8 KV heads, D = 128, bf16), for
each window `W` (4 sinks + `W` keys):

* `window`: window attention alone (`attend`, the kernel `attn_implementation="neuralcache"` runs for
  sliding_window_kv);
* `fused`: the fused tensor_cache step (`moment_decode(out=state)`: window + write of the evicted pair into the
  fixed-shape moments, in place + memory read + log-sum-exp merge, one kernel), and its ratio to `window` (goal
  <= 1.2x);
* `unfused`: the same step as separate PyTorch ops (reference functions), for scale;
* `sdpa`: `torch.nn.functional.scaled_dot_product_attention` on the same keys/values, all visible (the
  window kernel's ratio to it: the cost of reading the layout);
* `bytes`: what the fused step must move beyond the window (moments read and written) relative to the window's
  K/V, a floor for the fused/window ratio when both run at memory bandwidth;
* `max err`: the fused step's output against the unfused reference on the same inputs (a check, not a timing).

Prefill (a block of `--prefill` queries over as many keys, band `W` and 4 sinks): our prefill kernel against SDPA
with the equivalent boolean mask and against causal SDPA (no mask, full attention), and the fused tensor_cache
prefill (window + memory read at per-query prefixes of as many evicted pairs + merge) against our window kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--interpret", action="store_true", help="CPU: run the Triton kernels in the interpreter")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--heads", type=int, nargs=3, default=None, metavar=("HQ", "HKV", "D"))
    parser.add_argument("--windows", type=int, nargs="+", default=None)
    parser.add_argument("--prefill", type=int, default=None, help="queries of the prefill row (0: none)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    defaults = dict(
        dtype="bfloat16" if gpu else "float32",
        batch=1,
        heads=[32, 8, 128] if gpu else [4, 2, 16],
        windows=[256, 1024, 4096] if gpu else [32],
        prefill=2048 if gpu else 24,
        iters=200 if gpu else 2,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def timer(device: str, iters: int):
    """`measure(fn) -> seconds per call`, median of `iters` calls after warm-up (CUDA events on a GPU)."""
    import torch

    def measure(fn) -> float:
        for _ in range(3 if device == "cuda" else 1):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)

    return measure


def decode_times(window, b, hq, hkv, d, sinks, rand, measure, device) -> dict:
    """Seconds of window-only, fused, unfused and SDPA for `sinks + window` keys; the byte floor; the fused error."""
    import torch
    import torch.nn.functional as F
    from hf_neuralcache.kernels.fast_weight import moment_decode, moment_state, naive
    from hf_neuralcache.kernels.window_attention import attend, window_visibility

    from hf_neuralcache.testing import random_layout

    scaling = d**-0.5
    k = sinks + window
    query, key, value = rand(b, hq, 1, d), rand(b, hkv, k, d), rand(b, hkv, k, d)
    slots, valid, sink, q_slots = random_layout(b, k, 1, sinks, device=device, holes=False)
    layout = (slots, valid, sink, q_slots, window + 1)  # every key visible: the same work as SDPA
    state = moment_state(b, hkv, d, d, "moment", device)
    state = naive.moment_write(state, rand(b, hkv, 8, d), rand(b, hkv, 8, d), torch.ones(b, 8, device=device),
                               torch.zeros(hkv, device=device))  # fmt: skip
    ev_k, ev_v, weights = rand(b, hkv, 1, d), rand(b, hkv, 1, d), torch.ones(b, 1, device=device)
    log_decay = torch.zeros(hkv, device=device)

    def unfused():
        visible = window_visibility(q_slots, slots, valid, sink, window + 1)
        out, lse = naive.window_attention_lse(query, key, value, visible, scaling)
        after = naive.moment_write(state, ev_k, ev_v, weights, log_decay)
        prefix = torch.ones(1, dtype=torch.long, device=device)
        mem, mem_lse = naive.moment_read(state, query, ev_k, ev_v, weights, prefix, log_decay, scaling)
        return naive.merge_softmax(out, lse, mem, mem_lse), after

    pair = (ev_k, ev_v, weights, log_decay)
    fused, _, _ = moment_decode(query, key, value, *layout, scaling, state, *pair, write=True)
    error = (fused - unfused()[0][0]).abs().max().item()  # the kernel against the reference, on these shapes
    fixed = naive.MomentState(*(None if t is None else t.clone() for t in state))  # updated in place, as compiled
    t_window = measure(lambda: attend(query, key, value, *layout, scaling))
    t_fused = measure(lambda: moment_decode(query, key, value, *layout, scaling, fixed, *pair, out=fixed))
    t_unfused = measure(unfused)
    t_sdpa = measure(lambda: F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True))
    kv_bytes = 2 * k * d * key.element_size()
    state_bytes = 2 * 4 * (1 + 2 * d + d * d)  # moments read and written, float32
    floor = (kv_bytes + state_bytes) / kv_bytes
    return dict(window=t_window, fused=t_fused, unfused=t_unfused, sdpa=t_sdpa, byte_floor=floor, max_err=error)


def decode_row(window, b, hq, hkv, d, sinks, rand, measure, device) -> str:
    """One row of the decode table (see `decode_times`), microseconds per layer step."""
    t = decode_times(window, b, hq, hkv, d, sinks, rand, measure, device)
    return (
        f"| {window} | {t['window'] * 1e6:.1f} | {t['fused'] * 1e6:.1f} | {t['fused'] / t['window']:.2f}x | "
        f"{t['unfused'] * 1e6:.1f} | {t['unfused'] / t['window']:.2f}x | {t['sdpa'] * 1e6:.1f} | "
        f"{t['window'] / t['sdpa']:.2f}x | {t['byte_floor']:.2f}x | {t['max_err']:.1e} |"
    )


def main() -> None:
    args = parse()
    if args.interpret:  # before Triton is imported: it decides then whether its functions are interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from hf_neuralcache.kernels.fast_weight import moment_prefill, moment_state
    from hf_neuralcache.kernels.window_attention import attend, window_visibility

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu for a smoke run")
    device, dtype = args.device, getattr(torch, args.dtype)
    hq, hkv, d = args.heads
    b, sinks = args.batch, 4
    scaling = d**-0.5
    measure = timer(device, args.iters)
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    path = "Triton" if device == "cuda" or args.interpret else "PyTorch reference"
    print(f"device={device} ({path}), dtype={args.dtype}, B={b}, Hq={hq}, Hkv={hkv}, D={d}, iters={args.iters}")
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    print("\ndecode, microseconds per layer step")
    print("| W | window | fused | fused/window | unfused | unfused/window | sdpa | window/sdpa | bytes fused/window "
          "| max err fused vs unfused |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for window in args.windows:
        print(decode_row(window, b, hq, hkv, d, sinks, rand, measure, device))

    if args.prefill:
        n, window = args.prefill, args.windows[0]
        query, key, value = rand(b, hq, n, d), rand(b, hkv, n, d), rand(b, hkv, n, d)
        q_slots = torch.arange(n, device=device)  # a first chunk: positions 0 .. n-1, the first 4 are sinks
        slots = q_slots.expand(b, -1)
        valid, sink = torch.ones_like(slots, dtype=torch.bool), slots < sinks
        mask = window_visibility(q_slots, slots, valid, sink, window).unsqueeze(1)  # [B, 1, q, K]
        t_ours = measure(lambda: attend(query, key, value, slots, valid, sink, q_slots, window, scaling))
        t_sdpa = measure(
            lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        )
        t_causal = measure(
            lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        )
        state = moment_state(b, hkv, d, d, "moment", device)
        pairs = rand(b, hkv, n, d), rand(b, hkv, n, d), torch.ones(b, n, device=device)
        prefix = torch.arange(n, device=device)  # query t has seen t of the chunk's n evicted pairs
        log_decay = torch.zeros(hkv, device=device)
        t_fused = measure(
            lambda: moment_prefill(
                query, key, value, slots, valid, sink, q_slots, window, scaling, state, *pairs, prefix, log_decay
            )  # fmt: skip
        )
        print(f"\nprefill of {n} queries, band {window} + {sinks} sinks, milliseconds")
        print("| ours | sdpa (band mask) | ours/sdpa | sdpa causal (full, no mask) | ours/causal | fused tensor_cache "
              f"({n} evicted) | fused/ours |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {t_ours * 1e3:.3f} | {t_sdpa * 1e3:.3f} | {t_ours / t_sdpa:.2f}x | {t_causal * 1e3:.3f} | "
            f"{t_ours / t_causal:.2f}x | {t_fused * 1e3:.3f} | {t_fused / t_ours:.2f}x |"
        )


if __name__ == "__main__":
    main()
