"""Two "hosts" share their prefix and inference caches through one Redis server: host B is served from host A's work.

Each host has its own empty local folder; they share nothing but the server. Host A answers a question (computed,
stored locally and, in the background, in Redis). Host B then asks the same question (an inference cache hit from
Redis) and another question with the same system prompt (a prefix cache hit: the system prompt's K/V come from
Redis). Every answer is checked against generate() without caches. The script starts no server:

    redis-server --port 6379 --save ""                                  # in another terminal, or any Redis
    python examples/shared_cache.py                                     # the embedded SmolLM2-135M-Instruct
    python examples/shared_cache.py --tiny                              # a tiny random llama, random token ids
    python examples/shared_cache.py --redis-url redis://host:6379/1     # another server or database

Without a reachable server it says so and exits with status 0. Its entries live in a namespace of their own and are
removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import torch

import hf_neuralcache
from hf_neuralcache.hooks.remote import RedisTier, redact
from hf_neuralcache.models import load_embedded_model, tiny_model

SYSTEM = "You are a concise assistant for a hardware store. " + " ".join(
    f"Policy {i}: answer in one sentence, name the aisle, and never promise delivery dates." for i in range(12)
)
QUESTIONS = ["Where are the hammers?", "Do you sell paint?"]


def reachable(url: str) -> str | None:
    """`None` when a Redis server answers at `url`, else why not (credentials as the caches read them)."""
    try:
        probe = RedisTier(url, "prefix", timeout=1.0)
    except (ImportError, ValueError) as err:
        return str(err)
    try:
        probe.client.ping()
    except Exception as err:  # noqa: BLE001 - any failure means: no usable server
        return f"{type(err).__name__}: {err}"
    finally:
        probe.client.close()
    return None


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


def host(folder: Path, url: str, namespace: str, tokenizer, chunk_tokens: int):
    """One host's caches: its own local folder, the shared server."""
    prefix = hf_neuralcache.PrefixCache(folder / "prefix", chunk_tokens=chunk_tokens, namespace=namespace, remote=url)
    answers = hf_neuralcache.InferenceCache(folder / "inference", namespace=namespace, tokenizer=tokenizer, remote=url)
    return prefix, answers


def ask(name: str, model, tokenizer, ids, caches, kwargs) -> None:
    prefix, answers = caches
    before = answers.stats()["hits"], prefix.stats()["hits"] + prefix.stats()["partial_hits"]
    with torch.inference_mode():
        cached = model.generate(ids, prefix_cache=prefix, inference_cache=answers, **kwargs)
        plain = model.generate(ids, **kwargs)
    if answers.stats()["hits"] > before[0]:
        how = "inference cache hit (the whole answer)"
    elif prefix.stats()["hits"] + prefix.stats()["partial_hits"] > before[1]:
        how = f"prefix cache hit ({prefix.stats()['tokens_reused']} prompt tokens' K/V loaded, the rest computed)"
    else:
        how = "computed"
    answer = cached[0, ids.shape[1] :]
    text = tokenizer.decode(answer, skip_special_tokens=True).strip() if tokenizer else answer.tolist()[:8]
    print(f"{name}: {how}: {text}")
    print(f"  identical to generating without the caches: {torch.equal(cached, plain)}")


def show(name: str, caches) -> None:
    for cache in caches:
        stats = cache.stats()
        keys = ("hits", "partial_hits", "misses", "tokens_reused", "storage_errors", "skipped", "entries")
        print(f"  {name} {cache.store.kind} stats: {({k: stats[k] for k in keys if k in stats})}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="The server (default: %(default)s).")
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random llama and random token ids (fast).")
    parser.add_argument("--chunk-tokens", type=int, default=64, help="Tokens per cached prefix chunk.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Tokens to generate per question.")
    args = parser.parse_args(argv)

    why = reachable(args.redis_url)
    if why is not None:
        print(f"No Redis server reachable at {redact(args.redis_url)} ({why}).")
        print("Start one (redis-server --port 6379 --save \"\") or pass --redis-url; nothing was run.")
        return 0
    model, tokenizer = (tiny_model("llama"), None) if args.tiny else load_embedded_model()
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if args.tiny:
        kwargs["min_new_tokens"] = args.max_new_tokens  # a random model may emit EOS at any point
    first, second = prompts(args.tiny, tokenizer, model.config.vocab_size)
    namespace = f"shared-cache-example-{uuid.uuid4().hex[:8]}"  # this run's entries only, removed at the end
    with tempfile.TemporaryDirectory(prefix="host-a-") as a, tempfile.TemporaryDirectory(prefix="host-b-") as b:
        host_a = host(Path(a), args.redis_url, namespace, tokenizer, args.chunk_tokens)
        ask("host A, question 1", model, tokenizer, first, host_a, kwargs)
        show("host A", host_a)
        for cache in host_a:
            cache.close()  # waits for the background writer: host A's entries are in Redis now

        host_b = host(Path(b), args.redis_url, namespace, tokenizer, args.chunk_tokens)
        print(f"host B starts with an empty folder: {sum(c.stats()['entries'] for c in host_b)} local entries")
        ask("host B, question 1", model, tokenizer, first, host_b, kwargs)
        ask("host B, question 2", model, tokenizer, second, host_b, kwargs)
        show("host B", host_b)
        print("host B's Redis hits filled its local folder: the next lookups of these entries stay local")
        for cache in host_b:
            cache.clear()  # this namespace's entries, locally and in Redis
            cache.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
