"""The semantic cache across hosts: two caches with their own folders ("hosts") and one real Redis."""

from __future__ import annotations

import json
import time

import pytest
import torch
from semantic_helpers import Forwards, ask, chat, make

from hf_neuralcache.hooks.remote import _Breaker
from hf_neuralcache.hooks.storage import encode_entry
from hf_neuralcache.models import tiny_model
from hf_neuralcache.semantic.records import entry_key

QUESTION, PARAPHRASE = "what is the capital of france", "whats the capital of france"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def host(path, server, **kwargs):
    cache = make(path, remote=server.url, **kwargs)
    cache.refresh_seconds = 0.0
    tier = cache.store.remote
    tier.breaker = _Breaker(0.2)  # a server that comes back is tried again soon
    return cache


def plain(model, question):
    return model.generate(chat(question), max_new_tokens=5, do_sample=False)


def tail(output):
    return output[0, -5:].tolist()


def test_an_answer_stored_on_a_is_served_on_b_within_refresh_seconds(model, tmp_path, redis_server):
    a, b = host(tmp_path / "a", redis_server), host(tmp_path / "b", redis_server)
    b.refresh_seconds = 0.2
    first = ask(model, a, QUESTION)
    assert a.store.remote.flush()
    time.sleep(0.25)
    with Forwards(model) as forwards:
        hit = ask(model, b, PARAPHRASE)
    assert forwards.count == 0 and tail(hit) == tail(first)
    assert b.stats()["hits"] == 1 and b.stats()["entries"] == 1
    assert a.stats()["entries"] == 1  # a does not take its own addition in twice
    redis_server.kill()  # b copied the answer into its own folder and index
    with Forwards(model) as forwards:
        assert tail(ask(model, b, QUESTION)) == tail(first)
    assert forwards.count == 0
    a.close(), b.close()


def test_a_host_opened_later_catches_up_on_open(model, tmp_path, redis_server):
    a = host(tmp_path / "a", redis_server)
    questions = [QUESTION, "what is the capital of germany", "explain how cache works"]
    answers = [ask(model, a, q) for q in questions]
    assert a.store.remote.flush()
    b = host(tmp_path / "b", redis_server)
    assert b.stats()["entries"] == 3
    with Forwards(model) as forwards:
        for question, answer in zip(questions, answers, strict=True):
            assert tail(ask(model, b, question)) == tail(answer)
    assert forwards.count == 0 and b.stats()["integrity_errors"] == 0
    a.close(), b.close()


def test_delete_and_clear_on_a_remove_the_answer_on_b(model, tmp_path, redis_server):
    a, b = host(tmp_path / "a", redis_server), host(tmp_path / "b", redis_server)
    ask(model, a, QUESTION)
    ask(model, a, "explain how cache works")
    assert a.store.remote.flush()
    ask(model, b, PARAPHRASE)
    assert b.stats()["hits"] == 1 and b.stats()["entries"] == 2
    assert a.delete(QUESTION) == 1
    assert a.store.remote.flush()
    with Forwards(model) as forwards:
        ask(model, b, PARAPHRASE)
    assert forwards.count > 0 and b.stats()["hits"] == 1  # b's copy is gone: it ran the model
    assert b.store.remote.flush()
    client = redis_server.client()
    assert len(client.keys("hfnc:semantic:*")) == 2  # the other answer, and b's new one
    a.clear()
    assert a.store.remote.flush() and client.keys("hfnc:semantic:*") == []
    b._refresh()
    assert b.stats()["entries"] == 0
    with Forwards(model) as forwards:
        ask(model, b, "explain how cache works")
    assert forwards.count > 0
    a.close(), b.close()


def test_an_answer_expired_or_removed_in_redis_is_a_miss_not_an_error(model, tmp_path, redis_server):
    a = host(tmp_path / "a", redis_server, ttl=0.6)
    want = ask(model, a, QUESTION)
    assert a.store.remote.flush()
    b = host(tmp_path / "b", redis_server)  # copies it while it lives, with the time it has left
    assert b.stats()["entries"] == 1
    time.sleep(0.7)
    c = host(tmp_path / "c", redis_server)  # opened after it expired: never indexed
    b.refresh_seconds = c.refresh_seconds = 1e9  # (so that neither takes in the other's new answer)
    for cache in (b, c):
        with Forwards(model) as forwards:
            assert tail(ask(model, cache, PARAPHRASE)) == tail(plain(model, PARAPHRASE)) != tail(want)
        assert forwards.count > 0 and cache.stats()["hits"] == 0
    d = host(tmp_path / "d", redis_server)
    ask(model, d, "explain how cache works")
    assert all(cache.store.remote.flush() for cache in (b, c, d))
    client = redis_server.client()
    for key in client.keys("hfnc:semantic:*"):
        client.delete(key)  # removed behind the caches' backs
    e = host(tmp_path / "e", redis_server)
    assert e.stats()["entries"] == 0
    with Forwards(model) as forwards:
        assert tail(ask(model, e, "explain how cache works")) == tail(plain(model, "explain how cache works"))
    assert forwards.count > 0
    for cache in (b, c, e):
        stats = cache.stats()
        assert stats["integrity_errors"] == 0 and stats["storage_errors"] == 0, stats
    for cache in (a, b, c, d, e):
        cache.close()


def test_forged_and_corrupt_events_and_answers_are_misses_counted_as_integrity_errors(model, tmp_path, redis_server):
    a = host(tmp_path / "a", redis_server, secret="s3cret")
    want = ask(model, a, QUESTION)
    assert a.store.remote.flush()
    client = redis_server.client()
    (event,) = [json.loads(fields[b"e"]) for _, fields in client.xrange(a.log.stream)]
    (rkey,) = client.keys("hfnc:semantic:*")
    good = client.get(rkey)
    other = "explain how cache works"
    forged_key = entry_key(event["context"], other)
    bad_events = [
        {b"x": b"{}"},  # no event field
        {b"e": b"\x80\x04K\x01."},  # a pickle
        {b"e": b"[1, 2]"},
        {b"e": json.dumps({**event, "op": "upsert"}).encode()},
        {b"e": json.dumps({**event, "namespace": "other"}).encode()},
        {b"e": json.dumps({**event, "request": other}).encode()},  # the key is not its context's and request's
        {b"e": json.dumps({**event, "key": forged_key, "request": other}).encode()},  # its answer is planted below
        {b"e": json.dumps({**event, "model": "../" * 50}).encode()},
        {b"e": b"{" * 100_000},
    ]
    for fields in bad_events:
        client.xadd(a.log.stream, fields)
    # the planted answer: a valid entry (without the secret's MAC) under the forged event's key
    tensors = {"new_tokens": torch.zeros(1, 5, dtype=torch.long), "embedding": torch.zeros(64)}
    planted = rkey.decode().rsplit(":", 1)[0] + ":" + forged_key
    client.set(planted, encode_entry(forged_key, tensors, {"request": other}))
    client.set(rkey, good[:-9])  # the real answer, truncated
    b = host(tmp_path / "b", redis_server, secret="s3cret")
    stats = b.stats()
    assert stats["entries"] == 0 and stats["integrity_errors"] == 10, stats  # 8 events, 2 answers
    assert tail(ask(model, b, QUESTION)) == tail(want) and b.stats()["hits"] == 0  # (asking `other` would
    # overwrite the planted answer with a real one: the forged event's key is the real key of that request)
    # without a secret both answers decode: one is not its event's request, the other has no usable embedding
    assert b.store.remote.flush()
    client.set(rkey, encode_entry(rkey.decode().rsplit(":", 1)[1], tensors, {"request": "something else"}))
    client.set(planted, encode_entry(forged_key, tensors, {"request": other}))  # b dropped it as bad
    c = host(tmp_path / "c", redis_server)
    stats = c.stats()
    assert stats["entries"] == 0 and stats["integrity_errors"] == 10, stats  # the 8 events, these 2 answers
    assert tail(ask(model, c, QUESTION)) == tail(want)
    a.close(), b.close(), c.close()


def test_redis_killed_paused_or_restarted_never_fails_or_stalls_a_request(model, tmp_path, redis_server):
    a, b = host(tmp_path / "a", redis_server), host(tmp_path / "b", redis_server)
    questions = ["what is the capital of germany", "explain how cache works", "be a pirate please", "be brief"]
    wanted = {q: tail(plain(model, q)) for q in questions}

    def run_all(questions):
        for question in questions:
            for cache in (a, b):
                begin = time.perf_counter()
                out = ask(model, cache, question)
                assert time.perf_counter() - begin < 1.0
                assert tail(out) == wanted[question]

    redis_server.pause()
    try:
        run_all(questions[:2])
    finally:
        redis_server.resume()
    redis_server.kill()
    run_all(questions[2:])
    redis_server.start()  # empty: the stream and the answers are gone
    deadline = time.monotonic() + 30
    while not (a.store.remote.available and b.store.remote.available) and time.monotonic() < deadline:
        time.sleep(0.05)  # each tier's breaker waits out its backoff, then probes the server again
    new = "what is the capital of france"
    want = ask(model, a, new)
    assert a.store.remote.flush()
    with Forwards(model) as forwards:  # b reads the new stream from its start
        assert tail(ask(model, b, PARAPHRASE)) == tail(want)
    assert forwards.count == 0
    for cache in (a, b):
        assert cache.stats()["storage_errors"] >= 1
        cache.close()
