"""The Redis tier: shared across "hosts" (separate local folders), checked like disk, never a failed request."""

from __future__ import annotations

import logging
import socket
import sys
import time

import pytest
import torch

from hf_neuralcache import InferenceCache, PrefixCache
from hf_neuralcache.hooks.remote import RedisTier, _Breaker, redact
from hf_neuralcache.hooks.storage import encode_entry
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import ForwardCounter


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def ids(n=12, seed=0, batch=1):
    return torch.randint(5, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, prompt, **kwargs):
    return model.generate(prompt, max_new_tokens=6, do_sample=False, **kwargs)


def test_inference_answer_written_on_host_a_is_served_on_host_b(model, tmp_path, redis_server):
    a = InferenceCache(tmp_path / "a", remote=redis_server.url)
    b = InferenceCache(tmp_path / "b", remote=redis_server.url)
    prompt = ids()
    first = greedy(model, prompt, inference_cache=a)
    assert a.store.remote.flush()
    with ForwardCounter(model) as forwards:
        second = greedy(model, prompt, inference_cache=b)
    assert forwards.count == 0 and torch.equal(first, second)
    assert b.stats()["hits"] == 1 and b.stats()["entries"] == 1  # the remote hit filled b's own folder
    redis_server.kill()  # from now on b answers from its disk tier alone
    with ForwardCounter(model) as forwards:
        assert torch.equal(greedy(model, prompt, inference_cache=b), first)
    assert forwards.count == 0
    a.close(), b.close()


def test_prefix_chunks_computed_on_a_are_loaded_on_b_exactly(model, tmp_path, redis_server):
    prompt = ids(40, seed=3)
    plain = model.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    a = PrefixCache(tmp_path / "a", chunk_tokens=8, remote=redis_server.url, cost_check=False)
    b = PrefixCache(tmp_path / "b", chunk_tokens=8, remote=redis_server.url, cost_check=False)
    greedy(model, prompt, prefix_cache=a)
    assert a.store.remote.flush()
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         prefix_cache=b)  # fmt: skip
    assert torch.equal(out.sequences, plain.sequences)
    for got, want in zip(out.logits, plain.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    stats = b.stats()
    assert stats["hits"] == 1 and stats["tokens_reused"] == 39 and stats["entries"] == 5
    keys = redis_server.client().keys("hfnc:prefix:*")
    assert len(keys) == 5 and all(k.decode().split(":")[3] for k in keys)  # the model's fingerprint is in the key
    a.close(), b.close()


def test_namespaces_and_kinds_do_not_mix(model, tmp_path, redis_server):
    prompt = ids()
    a = InferenceCache(tmp_path / "a", namespace="team a", remote=redis_server.url)
    b = InferenceCache(tmp_path / "b", namespace="team:b", remote=redis_server.url)
    greedy(model, prompt, inference_cache=a)
    a.store.remote.flush()
    greedy(model, prompt, inference_cache=b)
    assert b.stats()["hits"] == 0
    b.store.remote.flush()
    names = sorted(k.decode().split(":")[2] for k in redis_server.client().keys("hfnc:inference:*"))
    assert names == ["team%20a", "team%3Ab"]
    b.clear()  # clears its own namespace in Redis only
    assert [k.decode().split(":")[2] for k in redis_server.client().keys("hfnc:*")] == ["team%20a"]
    a.close(), b.close()


def test_corrupt_forged_and_foreign_values_in_redis_are_misses(model, tmp_path, redis_server, caplog):
    prompt = ids()
    a = InferenceCache(tmp_path / "a", remote=redis_server.url, secret="s3cret")
    want = greedy(model, prompt, inference_cache=a)
    a.store.remote.flush()
    client = redis_server.client()
    (rkey,) = client.keys("hfnc:inference:*")
    good = client.get(rkey)
    damaged = [
        good[:-7],  # truncated
        good[:60] + bytes([good[60] ^ 1]) + good[61:],  # one bit flipped
        b"\x80\x04K\x01.",  # a pickle
        b"not an entry at all",
        encode_entry(rkey.decode().rsplit(":", 1)[1], {"sequences": torch.zeros(1, 3, dtype=torch.long)}, {}),  # no MAC
    ]
    for n, value in enumerate(damaged):
        client.set(rkey, value)
        b = InferenceCache(tmp_path / f"b{n}", remote=redis_server.url, secret="s3cret")
        with caplog.at_level(logging.INFO, logger="hf_neuralcache"):
            assert torch.equal(greedy(model, prompt, inference_cache=b), want)
        stats = b.stats()
        assert stats["hits"] == 0 and stats["integrity_errors"] == 1, (n, stats)
        b.store.remote.flush()
        b.close()
    a.close()


def test_ttl_is_a_redis_expiry(model, tmp_path, redis_server):
    a = InferenceCache(tmp_path / "a", remote=redis_server.url, ttl=30)
    greedy(model, ids(), inference_cache=a)
    a.store.remote.flush()
    client = redis_server.client()
    (rkey,) = client.keys("hfnc:inference:*")
    assert 0 < client.pttl(rkey) <= 30_000
    a.close()


def test_per_namespace_byte_bound_evicts_least_recently_used(tmp_path, redis_server):
    tier = RedisTier(redis_server.url, "inference", "bounded", max_bytes=10_000)
    for n in range(6):
        assert tier.put(tier.key(f"k{n}"), bytes(3000), wait=True)
        if n == 2:
            assert tier.get(tier.key("k0")) is not None  # k0 used: k1 is the oldest now
    client = redis_server.client()
    left = sorted(k.decode().rsplit(":", 1)[1] for k in client.keys("hfnc:inference:*"))
    assert left == ["k3", "k4", "k5"]
    assert int(client.hget(tier.sizes_key, "total")) == 9000
    tier.delete(tier.key("k4"))  # a removal keeps the total right (a stale one would evict more than asked)
    assert int(client.hget(tier.sizes_key, "total")) == 6000 and client.zcard(tier.lru_key) == 2
    assert tier.put(tier.key("k6"), bytes(3000), wait=True)  # fits again: nothing evicted
    assert sorted(k.decode().rsplit(":", 1)[1] for k in client.keys("hfnc:inference:*")) == ["k3", "k5", "k6"]
    tier.close()


def test_server_down_at_start_killed_and_paused_never_fails_a_request(model, tmp_path, redis_server, caplog):
    prompt = ids(seed=7)
    want = greedy(model, prompt)
    redis_server.kill()
    cache = InferenceCache(tmp_path / "a", remote=redis_server.url, ram_bytes=0)
    tier = cache.store.remote
    tier.breaker = _Breaker(0.2)
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache"):
        assert torch.equal(greedy(model, prompt, inference_cache=cache), want)  # down at start
    assert any("Redis tier" in r.message and "skipped for" in r.message for r in caplog.records)
    redis_server.start()
    time.sleep(0.5)
    cache.clear()
    assert torch.equal(greedy(model, prompt, inference_cache=cache), want)
    assert tier.flush() and redis_server.client().keys("hfnc:*")  # written once the server is back
    redis_server.pause()  # hung: connections are accepted by the kernel, nothing answers
    try:
        seconds = []
        for n in range(5):
            fresh = ids(seed=100 + n)
            want = greedy(model, fresh)
            begin = time.perf_counter()
            out = greedy(model, fresh, inference_cache=cache)
            seconds.append(time.perf_counter() - begin)
            assert torch.equal(out, want)
        # one request pays the timeout (0.1 s) then the breaker skips the tier; generous bound for a loaded CI
        assert max(seconds) < 1.0, seconds
        begin = time.perf_counter()
        assert tier.get(tier.key("x")) is None
        assert time.perf_counter() - begin < 0.5
    finally:
        redis_server.resume()
    assert cache.stats()["storage_errors"] >= 1
    cache.close()


def test_credentials_are_never_logged(caplog):
    url = "redis://alice:hunter2@127.0.0.1:1/0"
    assert "hunter2" not in redact(url) and "alice" not in redact(url)
    tier = RedisTier(url, "inference", timeout=0.05)
    with caplog.at_level(logging.DEBUG, logger="hf_neuralcache"):
        assert tier.get(tier.key("k")) is None
    assert caplog.records and not any("hunter2" in r.getMessage() or "alice" in r.getMessage() for r in caplog.records)
    assert "hunter2" not in repr(tier)


@pytest.mark.parametrize("bad", ["http://host:6379", "host:6379", 6379, "file:///tmp/x"])
def test_bad_remote_is_one_clear_error(tmp_path, bad):
    with pytest.raises(ValueError, match="redis://"):
        InferenceCache(tmp_path, remote=bad)


def test_remote_dtype_halves_the_bytes_and_stays_close(model, tmp_path, redis_server):
    prompt = ids(40, seed=5)
    plain = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    a = PrefixCache(tmp_path / "a", chunk_tokens=8, remote=redis_server.url, remote_dtype="bfloat16", cost_check=False)
    model.generate(prompt, max_new_tokens=1, prefix_cache=a)
    assert a.store.remote.flush()
    client = redis_server.client()
    remote_bytes = sum(client.strlen(k) for k in client.keys("hfnc:prefix:*"))
    assert remote_bytes < 0.6 * a.stats()["bytes"]  # about half of the fp32 entries on a's disk
    b = PrefixCache(tmp_path / "b", chunk_tokens=8, remote=redis_server.url, cost_check=False)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         prefix_cache=b)  # fmt: skip
    assert b.stats()["tokens_reused"] == 39
    error = max((got - want).abs().max().item() for got, want in zip(out.logits, plain.logits, strict=True))
    assert 0 < error < 0.05  # not exact, but close (the docs state the real model's figure)
    a.close(), b.close()


@pytest.mark.parametrize("bad", ["int8", "bogus", "_C", 3])
def test_bad_remote_dtype(tmp_path, bad):
    with pytest.raises(ValueError, match="remote_dtype must be a floating-point"):
        PrefixCache(tmp_path, remote_dtype=bad)


@pytest.mark.parametrize(
    "url",
    ["redis://alice:hunter2@host:6379/0", "redis://:hunter2@host/0", "redis://host:6379/0?password=hunter2&db=1",
     "unix:///tmp/redis.sock?db=0&password=hunter2"],
)  # fmt: skip
def test_redact_hides_every_credential_form(url):
    shown = redact(url)
    assert "hunter2" not in shown and "alice" not in shown and "***" in shown and shown.split(":")[0] in url


def test_a_damaged_or_foreign_prefix_chunk_in_redis_is_recomputed(model, tmp_path, redis_server):
    prompt = ids(40, seed=9)
    plain = greedy(model, prompt)
    a = PrefixCache(tmp_path / "a", chunk_tokens=8, remote=redis_server.url, cost_check=False)
    greedy(model, prompt, prefix_cache=a)
    assert a.store.remote.flush()
    client = redis_server.client()
    keys = sorted(client.keys("hfnc:prefix:*"))
    value = client.get(keys[0])
    damaged = value[:100] + bytes([value[100] ^ 0x10]) + value[101:]  # one bit
    client.set(keys[0], damaged)
    foreign = encode_entry(keys[1].decode().rsplit(":", 1)[1], {"k.0": torch.zeros(1, 8, 3)}, {"index": 1})
    client.set(keys[1], foreign)  # a valid blob for the key, but not this model's chunk
    for n in range(2):
        b = PrefixCache(tmp_path / f"b{n}", chunk_tokens=8, remote=redis_server.url, cost_check=False)
        assert torch.equal(greedy(model, prompt, prefix_cache=b), plain)
        stats = b.stats()
        assert stats["integrity_errors"] >= 1 and stats["storage_errors"] == 0, stats
        b.close()  # waits for its writes
        assert client.get(keys[0]) == value  # dropped, then written again by the host that recomputed it
    a.close()


def test_tls_and_a_password_from_the_environment(model, tmp_path, monkeypatch, caplog):
    """`rediss://` with the server's CA, and a password that only the environment holds (never logged)."""
    import shutil
    import ssl
    import subprocess

    from redis_helpers import ENABLE, free_port

    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip(ENABLE + " (and openssl)")
    pytest.importorskip("redis", reason=ENABLE)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", "s3cret-pw", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(cert))
        for _ in range(200):
            try:
                with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=0.2),
                                         server_hostname="127.0.0.1"):
                    break
            except OSError:
                time.sleep(0.02)
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        monkeypatch.setenv("HF_NEURALCACHE_REDIS_PASSWORD", "s3cret-pw")
        tls = dict(timeout=1.0)  # the TLS handshake on a loaded 2-core machine
        a = InferenceCache(tmp_path / "a", remote=RedisTier(url, "inference", **tls))
        b = InferenceCache(tmp_path / "b", remote=RedisTier(url, "inference", **tls))
        prompt = ids(seed=11)
        with caplog.at_level(logging.DEBUG, logger="hf_neuralcache"):
            first = greedy(model, prompt, inference_cache=a)
            assert a.store.remote.flush()
            with ForwardCounter(model) as forwards:
                assert torch.equal(greedy(model, prompt, inference_cache=b), first)
        assert forwards.count == 0 and b.stats()["hits"] == 1 and b.stats()["storage_errors"] == 0
        monkeypatch.setenv("HF_NEURALCACHE_REDIS_PASSWORD", "wrong")
        c = InferenceCache(tmp_path / "c", remote=RedisTier(url, "inference", **tls))
        with caplog.at_level(logging.DEBUG, logger="hf_neuralcache"):
            assert torch.equal(greedy(model, prompt, inference_cache=c), first)  # refused: a miss, computed
        assert c.stats()["hits"] == 0 and c.stats()["storage_errors"] >= 1
        assert not any("s3cret-pw" in r.getMessage() or "wrong" in r.getMessage() for r in caplog.records)
        a.close(), b.close(), c.close()
    finally:
        server.terminate()
        server.wait(5)


def test_without_the_redis_client_a_remote_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'hf-neuralcache\[redis\]'"):
        InferenceCache(tmp_path, remote="redis://127.0.0.1:6379/0")
    assert InferenceCache(tmp_path / "local").stats()["hits"] == 0  # local caches need no client
