"""SemanticCache mechanics with a deterministic test embedder: matching, context, guard, persistence, recovery."""

from __future__ import annotations

import logging

import pytest
import torch
from semantic_helpers import BagOfWords, Forwards, WordTokenizer, ask, chat, make

import hf_neuralcache
from hf_neuralcache.hooks.samples import SampleSlots
from hf_neuralcache.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_a_paraphrase_gets_the_stored_answer_after_its_own_prompt(model, tmp_path):
    cache = make(tmp_path / "s")
    first = ask(model, cache, "what is the capital of france")
    prompt = chat("tell me the capital of france please")
    with Forwards(model) as forwards:
        hit = model.generate(prompt, max_new_tokens=5, do_sample=False, semantic_cache=cache)
    assert forwards.count == 0 and cache.stats()["hits"] == 1
    assert torch.equal(hit[:, : prompt.shape[1]], prompt)
    assert torch.equal(hit[:, prompt.shape[1] :], first[:, chat("what is the capital of france").shape[1] :])


def test_the_guard_rejects_look_alikes(model, tmp_path):
    cache = make(tmp_path / "s")
    ask(model, cache, "what is the capital of france")
    with Forwards(model) as forwards:
        ask(model, cache, "what is the capital of germany")
    assert forwards.count > 0 and cache.stats()["near_misses"] == 1 and cache.stats()["hits"] == 0


def test_context_settings_and_namespace_must_match_exactly(model, tmp_path):
    cache = make(tmp_path / "s")
    ask(model, cache, "what is the capital of france", system="be brief")
    ask(model, cache, "what is the capital of france", system="be a pirate")  # other system prompt
    ask(model, cache, "what is the capital of france", system="be brief", max_new_tokens=4)  # other settings
    other = make(tmp_path / "s", namespace="tenant-b")
    ask(model, other, "what is the capital of france", system="be brief")
    assert cache.stats()["hits"] == 0 and other.stats()["hits"] == 0
    ask(model, cache, "whats the capital of france", system="be brief")
    assert cache.stats()["hits"] == 1


def test_what_is_never_cached(model, tmp_path, caplog):
    cache = make(tmp_path / "s")
    for _ in range(2):
        ask(model, cache, "what is the capital of france today")
    assert cache.stats()["not_cacheable"] == 2 and cache.stats()["entries"] == 0
    two = torch.cat([chat("what is the capital of france")] * 2)
    model.generate(two, max_new_tokens=3, semantic_cache=cache)
    ask(model, cache, "explain how cache works", num_beams=2, num_return_sequences=2)
    assert cache.stats()["bypassed"] == 2 and cache.stats()["entries"] == 0
    assert cache.stats()["bypassed_by"] == {"a batch of several prompts": 1, "num_return_sequences > 1": 1}
    no_tokenizer = make(tmp_path / "t", tokenizer=None)
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache"):
        ask(model, no_tokenizer, "what is the capital of france")
        ask(model, no_tokenizer, "what is the capital of germany")
    assert no_tokenizer.stats()["bypassed"] == 2 and caplog.text.count("no tokenizer") == 1


def test_sampled_requests_keep_k_answers_then_one_is_served_at_random(model, tmp_path):
    cache = make(tmp_path / "s", sampled_answers=2)
    torch.manual_seed(0)
    drawn = [ask(model, cache, "what is the capital of france", do_sample=True, max_new_tokens=6) for _ in range(2)]
    assert cache.stats()["misses"] == 2 and cache.stats()["entries"] == 1  # one request, two answers
    with Forwards(model) as forwards:
        served = [ask(model, cache, "whats the capital of france", do_sample=True, max_new_tokens=6)
                  for _ in range(8)]  # fmt: skip
    assert forwards.count == 0 and cache.stats()["hits"] == 8
    tails = {tuple(d[0, -6:].tolist()) for d in drawn}
    assert {tuple(s[0, -6:].tolist()) for s in served} <= tails
    (key,) = [record["key"] for record in cache._labels.values()]
    assert sum(cache.store.contains(k) for k in SampleSlots.all_keys(key)) == 2
    assert cache.delete("what is the capital of france") == 1
    assert not any(cache.store.contains(k) for k in SampleSlots.all_keys(key))  # every answer of the request


def test_persisted_index_reloads_and_a_corrupt_one_is_rebuilt(model, tmp_path, caplog):
    cache = make(tmp_path / "s")
    ask(model, cache, "what is the capital of france")
    ask(model, cache, "explain how cache works")
    cache.close()
    reopened = make(tmp_path / "s")
    assert reopened.stats()["entries"] == 2
    ask(model, reopened, "whats the capital of france")
    assert reopened.stats()["hits"] == 1
    reopened.close()
    index = tmp_path / "s" / "index.bin"
    index.write_bytes(index.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        rebuilt = make(tmp_path / "s")
    assert "unusable (checksum mismatch); rebuilding" in caplog.text
    ask(model, rebuilt, "whats the capital of france")
    assert rebuilt.stats()["hits"] == 1 and rebuilt.stats()["entries"] == 2


def test_a_folder_written_with_another_embedder_is_embedded_again_on_opening(model, tmp_path):
    class Renamed(BagOfWords):  # as MiniLM in bfloat16 and float32: close vectors, another fingerprint
        fingerprint = "test-bag-of-words-64:bf16"

        def encode(self, texts):
            self.calls = getattr(self, "calls", 0) + len(texts)
            return super().encode(texts)

    cache = make(tmp_path / "s")
    first = ask(model, cache, "what is the capital of france")
    cache.close()
    embedder = Renamed()
    reopened = make(tmp_path / "s", embedder=embedder)
    assert embedder.calls == 1 and reopened.stats()["entries"] == 1  # the stored request, embedded once more
    with Forwards(model) as forwards:
        hit = ask(model, reopened, "whats the capital of france")
    assert forwards.count == 0 and reopened.stats()["hits"] == 1
    assert torch.equal(hit[:, -5:], first[:, -5:])


def test_a_crash_between_the_two_writes_never_serves_a_wrong_answer(model, tmp_path):
    cache = make(tmp_path / "s")
    ask(model, cache, "what is the capital of france")
    (label,) = list(cache._labels)
    cache.store.delete(cache._labels[label]["key"])  # the answer is gone, its index entry and record remain
    with Forwards(model) as forwards:
        ask(model, cache, "whats the capital of france")
    assert forwards.count > 0 and cache.stats()["hits"] == 0
    cache.store.update_record("next_label", lambda r: {"value": r["value"] + 1})  # a label reserved, never recorded
    fresh = make(tmp_path / "s")
    assert fresh.stats()["entries"] == 1  # the answer stored again by the last call; the orphan label skipped
    ask(model, fresh, "whats the capital of france")
    assert fresh.stats()["hits"] == 1


def test_two_objects_on_one_folder_see_each_others_answers(model, tmp_path):
    writer, reader = make(tmp_path / "s"), make(tmp_path / "s")
    reader.refresh_seconds = 0.0
    ask(model, writer, "what is the capital of france")
    ask(model, reader, "whats the capital of france")
    assert reader.stats()["hits"] == 1


def test_bounds_evict_oldest_and_ttl_expires(model, tmp_path):
    cache = make(tmp_path / "s", max_entries=2)
    for question in ("what is the capital of france", "explain how cache works", "tell me a pirate"):
        ask(model, cache, question)
    assert cache.stats()["entries"] == 2 and len(cache.store) == 2
    ask(model, cache, "whats the capital of france")  # evicted: a miss
    assert cache.stats()["hits"] == 0
    short = make(tmp_path / "t", ttl=0.3)
    ask(model, short, "explain how cache works")
    import time

    time.sleep(0.5)
    ask(model, short, "explain how cache works please")
    assert short.stats()["hits"] == 0


def test_attach_and_bad_arguments(model, tmp_path):
    cache = make(tmp_path / "s")
    hf_neuralcache.attach(model, semantic_cache=cache, tokenizer=WordTokenizer())
    try:
        model.generate(chat("what is the capital of france"), max_new_tokens=3)
        model.generate(chat("whats the capital of france"), max_new_tokens=3)
    finally:
        hf_neuralcache.detach(model)
    assert cache.stats()["hits"] == 1
    with pytest.raises(ValueError, match="threshold must be a cosine similarity"):
        make(tmp_path / "x", threshold=2)
    with pytest.raises(ValueError, match="candidates must be an int >= 1"):
        make(tmp_path / "y", candidates=0)
    with pytest.raises(ValueError, match="guard must be"):
        make(tmp_path / "z", guard=42)
    with pytest.raises(ValueError, match="semantic_cache must be an hf_neuralcache.SemanticCache"):
        model.generate(chat("what"), semantic_cache="yes")


def test_cli_lists_and_clears_a_semantic_folder(model, tmp_path, capsys):
    from hf_neuralcache.cli import main

    cache = make(tmp_path / "s")
    ask(model, cache, "what is the capital of france")
    cache.close()
    assert main(["cache", "ls", str(tmp_path / "s")]) == 0
    assert "'request': 'what is the capital of france'" in capsys.readouterr().out
    assert main(["cache", "clear", str(tmp_path / "s")]) == 0
    assert not (tmp_path / "s" / "index.bin").exists()
    reopened = make(tmp_path / "s")
    assert reopened.stats()["entries"] == 0
    ask(model, reopened, "whats the capital of france")
    assert reopened.stats()["hits"] == 0


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def test_a_hit_returns_generates_type_exactly_and_streams_it(model, tmp_path):
    cache = make(tmp_path / "s")
    kwargs = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True}
    miss_stream, hit_stream = Recorder(), Recorder()
    first = ask(model, cache, "what is the capital of france", streamer=miss_stream, **kwargs)
    prompt = chat("whats the capital of france")
    hit = ask(model, cache, "whats the capital of france", streamer=hit_stream, **kwargs)
    assert cache.stats()["hits"] == 1 and cache.stats()["seconds_saved"] > 0
    assert type(hit) is type(first) and len(hit.scores) == len(first.scores) == 5
    new = first.sequences[:, chat("what is the capital of france").shape[1] :]
    assert torch.equal(hit.sequences, torch.cat([prompt, new], dim=1))
    for ours, stored in [*zip(hit.scores, first.scores, strict=True), *zip(hit.logits, first.logits, strict=True)]:
        assert torch.equal(ours, stored)
    # streamed the way generate streams: the prompt, one token at a time, end
    assert torch.equal(hit_stream.calls[0], prompt) and hit_stream.calls[-1] == "end"
    assert [tuple(c.shape) for c in hit_stream.calls[1:-1]] == [tuple(c.shape) for c in miss_stream.calls[1:-1]]
    assert torch.equal(torch.cat(hit_stream.calls[1:-1]), torch.cat(miss_stream.calls[1:-1]))
    plain = ask(model, cache, "whats the capital of france", max_new_tokens=5)  # other settings: a tensor, a miss
    assert isinstance(plain, torch.Tensor) and cache.stats()["hits"] == 1


def test_earlier_turns_the_model_and_the_namespace_must_match(model, tmp_path):
    cache = make(tmp_path / "s")
    before = (("explain how cache works", "a cache works"),)
    ask(model, cache, "what is the capital of france", history=before)
    with Forwards(model) as forwards:
        ask(model, cache, "whats the capital of france")  # no earlier turn
        ask(model, cache, "whats the capital of france", history=(("explain how cache works", "a pirate"),))
    assert forwards.count > 0 and cache.stats()["hits"] == 0
    ask(model, cache, "whats the capital of france", history=before)
    assert cache.stats()["hits"] == 1
    other_model = tiny_model("llama", seed=1)
    ask(other_model, cache, "whats the capital of france", history=before)
    assert cache.stats()["hits"] == 1
    tenant_a, tenant_b = make(tmp_path / "t", namespace="a"), make(tmp_path / "t", namespace="b")
    tenant_b.refresh_seconds = tenant_a.refresh_seconds = 0.0
    ask(model, tenant_a, "what is the capital of france")
    ask(model, tenant_b, "explain how cache works")
    ask(model, tenant_b, "whats the capital of france")
    ask(model, tenant_a, "explain how cache works please")
    assert tenant_a.stats()["hits"] == tenant_b.stats()["hits"] == 0
    ask(model, tenant_a, "whats the capital of france")
    ask(model, tenant_b, "explain how cache works please")
    assert tenant_a.stats()["hits"] == tenant_b.stats()["hits"] == 1


def test_clearing_the_folder_under_a_live_cache_never_reuses_its_labels(model, tmp_path):
    from hf_neuralcache.cli import main

    live = make(tmp_path / "s")
    live.refresh_seconds = 0.0
    ask(model, live, "what is the capital of france")
    assert main(["cache", "clear", str(tmp_path / "s")]) == 0
    other = make(tmp_path / "s")
    ask(model, other, "explain how cache works")
    assert min(other._labels) > max(live._labels)
    with Forwards(model) as forwards:
        ask(model, live, "whats the capital of france")  # cleared: not served
    assert forwards.count > 0
    ask(model, live, "explain how cache works please")  # the other process's new answer
    assert live.stats()["hits"] == 1


def test_stock_pipeline_through_attach_with_a_plain_prompt(tmp_path):
    """A text-generation pipeline (no chat template, a tokenizer that opens every prompt with [CLS])."""
    from transformers import AutoTokenizer, pipeline

    from hf_neuralcache.semantic.embedders import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    plain = pipe("what is the capital of france", **kwargs)[0]["generated_text"]
    cache = make(tmp_path / "s", tokenizer=None)
    hf_neuralcache.attach(model, semantic_cache=cache, tokenizer=tokenizer)
    try:
        first = pipe("what is the capital of france", **kwargs)[0]["generated_text"]
        with Forwards(model) as forwards:
            hit = pipe("whats the capital of france", **kwargs)[0]["generated_text"]
        pipe("what is the capital of germany", **kwargs)
    finally:
        hf_neuralcache.detach(model)
    assert first == plain and forwards.count == 0
    assert hit == "whats the capital of france" + first[len("what is the capital of france") :]
    assert (cache.stats()["hits"], cache.stats()["near_misses"]) == (1, 1)
    assert cache.records.read_all()[0]["request"] == "what is the capital of france"  # [CLS] and [SEP] are context


def test_a_sampling_pipeline_is_served_once_k_answers_are_stored(tmp_path):
    """A stock pipeline on a model whose generation config samples (as SmolLM2's does): hits, not silent bypasses."""
    from transformers import AutoTokenizer, pipeline

    from hf_neuralcache import InferenceCache
    from hf_neuralcache.semantic.embedders import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.generation_config.do_sample = True
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    inference = InferenceCache(tmp_path / "i", sampled_answers=2)
    semantic = make(tmp_path / "s", tokenizer=None, sampled_answers=2)
    hf_neuralcache.attach(model, inference_cache=inference, semantic_cache=semantic, tokenizer=tokenizer)
    try:
        answers = [pipe("what is the capital of france", max_new_tokens=4)[0]["generated_text"] for _ in range(2)]
        with Forwards(model) as forwards:
            again = [pipe("what is the capital of france", max_new_tokens=4)[0]["generated_text"] for _ in range(4)]
            paraphrase = pipe("whats the capital of france", max_new_tokens=4)[0]["generated_text"]
    finally:
        hf_neuralcache.detach(model)
    assert forwards.count == 0 and set(again) <= set(answers)
    assert inference.stats()["hits"] == 4 and semantic.stats()["hits"] == 1
    tails = {answer[len("what is the capital of france") :] for answer in answers}
    assert paraphrase[len("whats the capital of france") :] in tails
