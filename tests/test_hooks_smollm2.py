"""The generate() hooks on the embedded SmolLM2-135M-Instruct (fp32, CPU): exactness and stock pipelines."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

import hf_neuralcache
from hf_neuralcache import InferenceCache, PrefixCache
from hf_neuralcache.testing import assert_close

SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly and cite the rule." for i in range(30))


@pytest.fixture(scope="module")
def chats(smollm):
    _, tokenizer = smollm
    rows = []
    for question in ("What is a cache?", "Name a prime number."):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        rows.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt"))
    return [r if isinstance(r, torch.Tensor) else r["input_ids"] for r in rows]


def test_shared_system_prompt_hits_and_logits_match(smollm, chats, tmp_path):
    model, _ = smollm
    cache = PrefixCache(tmp_path / "prefix", chunk_tokens=64)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    model.generate(chats[0], prefix_cache=cache, **kwargs)
    ref = model.generate(chats[1], **kwargs)
    hit = model.generate(chats[1], prefix_cache=cache, **kwargs)
    stats = cache.stats()
    assert stats["hits"] + stats["partial_hits"] == 1 and stats["tokens_reused"] >= 256  # the system prompt
    assert torch.equal(hit.sequences, ref.sequences)
    for a, b in zip(hit.logits, ref.logits, strict=True):
        assert_close(a, b, 1e-5, "SmolLM2 fp32 logits with a partial prefix hit")
    full = model.generate(chats[1], prefix_cache=cache, **kwargs)
    assert cache.stats()["tokens_reused"] > stats["tokens_reused"] and torch.equal(full.sequences, ref.sequences)
    for a, b in zip(full.logits, ref.logits, strict=True):
        assert_close(a, b, 1e-5, "SmolLM2 fp32 logits with a full prefix hit")


def test_stock_pipeline_through_attach(smollm, tmp_path):
    model, tokenizer = smollm
    prefix, inference = PrefixCache(tmp_path / "p", chunk_tokens=32), InferenceCache(tmp_path / "i")
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 2?"}]
    plain = pipe(messages, max_new_tokens=8, do_sample=False)
    hf_neuralcache.attach(model, prefix_cache=prefix, inference_cache=inference, tokenizer=tokenizer)
    try:
        first = pipe(messages, max_new_tokens=8, do_sample=False)
        second = pipe(messages, max_new_tokens=8, do_sample=False)
        other = [messages[0], {"role": "user", "content": "What is 3 + 3?"}]
        pipe(other, max_new_tokens=8, do_sample=False)
    finally:
        hf_neuralcache.detach(model)
    assert plain == first == second
    assert inference.stats()["hits"] == 1 and inference.stats()["misses"] == 2
    assert prefix.stats()["tokens_reused"] >= 256  # the other question reused the system prompt's chunks
    today = [messages[0], {"role": "user", "content": "What day is today?"}]
    hf_neuralcache.attach(model, inference_cache=inference, tokenizer=tokenizer)
    try:
        pipe(today, max_new_tokens=4, do_sample=False)
    finally:
        hf_neuralcache.detach(model)
    assert inference.stats()["not_cacheable"] == 1


def test_semantic_cache_in_a_stock_pipeline_serves_paraphrases_not_look_alikes(smollm, tmp_path):
    """End to end on the embedded SmolLM2 with the default embedder (MiniLM), threshold and guard."""
    model, tokenizer = smollm
    cache = hf_neuralcache.SemanticCache(tmp_path / "semantic")
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)

    def reply(question):
        out = pipe([{"role": "user", "content": question}], max_new_tokens=8, do_sample=False)
        return out[0]["generated_text"][-1]["content"]

    plain = reply("What is the capital of France?")
    hf_neuralcache.attach(model, semantic_cache=cache, tokenizer=tokenizer)
    try:
        answers = [reply(q) for q in ("What is the capital of France?", "Which city is the capital of France?",
                                      "What is the capital of Germany?", "What day is today?")]  # fmt: skip
    finally:
        hf_neuralcache.detach(model)
    stats = cache.stats()
    assert answers[0] == answers[1] == plain
    assert (stats["hits"], stats["not_cacheable"], stats["entries"]) == (1, 1, 2)  # Germany: a near miss or a miss
