"""`hf-neuralcache cache stats|ls|prune|clear redis://...` on a real redis-server filled by real caches."""

from __future__ import annotations

import time

import pytest
import torch

from hf_neuralcache import InferenceCache, PrefixCache
from hf_neuralcache.cli import main
from hf_neuralcache.hooks.remote_admin import display_url, parse_key
from hf_neuralcache.models import tiny_model

GARBAGE = "hfnc:inference::0123456789abcdef:deadbeefdeadbeef"
FOREIGN = {"other:app:key": b"x", "hfnc:weird": b"y", "hfnc:inference:x": b"z", "hfnc#lru": b"w"}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def ids(seed, n=12):
    return torch.randint(5, 120, (1, n), generator=torch.Generator().manual_seed(seed))


def keys(client, pattern="*") -> set[str]:
    return {k.decode() for k in client.scan_iter(match=pattern)}


def fill(model, tmp_path, server):
    """3 inference entries (no namespace), 2 with a TTL in namespace 'team a', 2 prefix chunks, a garbage value
    under an entry key and foreign keys; returns the client."""
    url = server.url
    caches = [
        (InferenceCache(tmp_path / "a", remote=url), [0, 1, 2]),
        (InferenceCache(tmp_path / "b", namespace="team a", ttl=3600, remote=url), [3, 4]),
    ]
    for cache, seeds in caches:
        for seed in seeds:
            model.generate(ids(seed), max_new_tokens=2, do_sample=False, inference_cache=cache)
        assert cache.store.remote.flush()
        cache.close()
    prefix = PrefixCache(tmp_path / "p", chunk_tokens=8, remote=url, cost_check=False)
    model.generate(ids(9, 20), max_new_tokens=2, do_sample=False, prefix_cache=prefix)
    assert prefix.store.remote.flush()
    prefix.close()
    client = server.client()
    client.set(GARBAGE, b"not an entry at all")
    for key, value in FOREIGN.items():
        client.set(key, value)
    client.hset("myhash", "f", "v")
    return client


def run(capsys, *argv):
    code = main(["cache", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_key_and_display_url():
    k = parse_key(b"hfnc:inference:team%20a:0123456789abcdef:abc")
    assert (k.kind, k.namespace_text, k.model, k.key, k.role) == ("inference", "team a", "0123456789abcdef", "abc",
                                                                   "entry")  # fmt: skip
    assert parse_key("hfnc#lru:prefix:").role == "lru" and parse_key("hfnc#log:semantic:ns:emb").role == "log"
    for foreign in [*FOREIGN, "hfnc:other:ns:m:k", "hfnc:inference:a:b:c:d", "hfnc:inference:a b:m:k", b"\xff"]:
        assert parse_key(foreign) is None, foreign
    assert display_url("redis://alice:hunter2@h:1/0") == "redis://***@h:1/0"
    assert "hunter2" not in display_url("unix:///tmp/r.sock?db=0&password=hunter2")


def test_stats_counts_per_kind_and_namespace(model, tmp_path, redis_server, capsys):
    fill(model, tmp_path, redis_server)
    code, out, _ = run(capsys, "stats", redis_server.url)
    assert code == 0, out
    assert f"Redis {redis_server.url}, keys under 'hfnc'" in out and "maxmemory-policy noeviction" in out
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    assert "entries: 4," in lines["inference -"]  # 3 answers and the garbage value
    assert "entries: 2," in lines["inference 'team a'"] and "entries: 2," in lines["prefix -"]
    assert "total: 8 entries" in out and "weird" not in out and "other" not in out
    code, out, _ = run(capsys, "stats", redis_server.url, "--kind", "inference", "--namespace", "team a")
    assert code == 0 and "total: 2 entries" in out and "prefix" not in out


def test_ls_lists_entries_and_unreadable_values(model, tmp_path, redis_server, capsys):
    fill(model, tmp_path, redis_server)
    code, out, _ = run(capsys, "ls", redis_server.url)
    assert code == 0, out
    lines = out.splitlines()
    entries = [line for line in lines if line.startswith(("inference", "prefix"))]
    assert len(entries) == 8 and "(1 unreadable entries listed; `prune` removes them)" in lines
    (garbage,) = [line for line in entries if "deadbeef" in line]
    assert "unreadable: not an hf_neuralcache entry" in garbage and "model 0123456789abcdef" in garbage
    assert sum("'output': 'tensor'" in line for line in entries) == 5
    assert sum("'chunk_tokens': 8" in line for line in entries) == 2
    ttls = [line for line in entries if line.startswith("inference  'team a'")]
    assert len(ttls) == 2 and all("ttl 3,6" in line or "ttl 3,5" in line for line in ttls)
    assert "ttl -" in garbage and "weird" not in out and "other" not in out
    code, out, _ = run(capsys, "ls", redis_server.url, "--limit", "2", "--kind", "inference")
    assert out.splitlines()[-2] == "... (first 2 of 6 entries)" and len(out.splitlines()) == 4


def test_prune_removes_bad_values_and_stale_bookkeeping_and_evicts_lru(model, tmp_path, redis_server, capsys):
    client = fill(model, tmp_path, redis_server)
    url = redis_server.url
    bounded = InferenceCache(tmp_path / "c", namespace="bounded", remote=url, remote_bytes=10**9)
    order = []
    for seed in range(3):
        before = keys(client, "hfnc:inference:bounded:*")
        model.generate(ids(seed), max_new_tokens=2, do_sample=False, inference_cache=bounded)
        assert bounded.store.remote.flush()
        (new,) = keys(client, "hfnc:inference:bounded:*") - before
        order.append(new)
        time.sleep(0.01)
    bounded.close()
    reader = InferenceCache(tmp_path / "d", namespace="bounded", remote=url, remote_bytes=10**9)
    model.generate(ids(0), max_new_tokens=2, do_sample=False, inference_cache=reader)  # a remote hit: order[0] used
    reader.close()
    lru, sizes = "hfnc#lru:inference:bounded", "hfnc#size:inference:bounded"
    assert [m.decode() for m in client.zrange(lru, 0, -1)] == [order[1], order[2], order[0]]
    client.zadd(lru, {"hfnc:inference:bounded:0:gone": 1.0})
    client.hset(sizes, mapping={"hfnc:inference:bounded:0:gone": 5, "total": 999_999})
    foreign_before = {k: client.dump(k) for k in [*FOREIGN, "myhash"]}

    code, out, _ = run(capsys, "prune", url)
    assert code == 0, out
    assert "inference -: removed 0 expired, 1 bad and 0 evicted entries; 3 left" in out
    assert "inference 'bounded': removed 0 expired, 0 bad and 0 evicted entries; 1 stale bookkeeping" in out
    assert "total: removed 0 expired, 1 bad and 0 evicted entries; 10 left" in out
    assert not client.exists(GARBAGE) and {k: client.dump(k) for k in foreign_before} == foreign_before
    sizes_now = {k.decode(): int(v) for k, v in client.hgetall(sizes).items()}
    assert sizes_now.pop("total") == sum(sizes_now.values()) == sum(client.strlen(k) for k in order)
    assert set(sizes_now) == set(order) and client.zcard(lru) == 3

    total = sum(sizes_now.values())
    code, out, _ = run(capsys, "prune", url, "--kind", "inference", "--namespace", "bounded", "--max-bytes",
                       str(total - 1))  # fmt: skip
    assert code == 0 and "0 bad and 1 evicted entries (least recently used); 2 left" in out
    assert keys(client, "hfnc:inference:bounded:*") == {order[0], order[2]}  # order[1] was used least recently
    assert int(client.hget(sizes, "total")) == client.strlen(order[0]) + client.strlen(order[2])
    assert len(keys(client, "hfnc:inference::*")) == 3 and len(keys(client, "hfnc:prefix:*")) == 2


def test_prune_without_bookkeeping_evicts_by_idle_time(model, tmp_path, redis_server, capsys):
    client = fill(model, tmp_path, redis_server)
    client.delete(GARBAGE)
    entries = sorted(keys(client, "hfnc:inference::*"))
    time.sleep(2.2)  # the server's idle clock counts seconds
    client.get(entries[1])  # used now: the others have been idle longer
    total = sum(client.strlen(k) for k in entries)
    code, out, _ = run(capsys, "prune", redis_server.url, "--kind", "inference", "--namespace", "", "--max-bytes",
                       str(total - min(client.strlen(k) for k in entries)))  # fmt: skip
    assert code == 0 and "inference -: removed 0 expired, 0 bad and" in out
    assert entries[1] in keys(client, "hfnc:inference::*")
    assert "prefix" not in out and "'team a'" not in out and len(keys(client, "hfnc:inference:team%20a:*")) == 2
    code, out, _ = run(capsys, "prune", redis_server.url, "--namespace", "", "--max-bytes", "0")
    assert code == 0 and not keys(client, "hfnc:*:*:*:*") - keys(client, "hfnc:inference:team%20a:*")


def test_clear_by_namespace_then_all_leaves_foreign_keys(model, tmp_path, redis_server, capsys):
    client = fill(model, tmp_path, redis_server)
    InferenceCache(tmp_path / "e", namespace="x", remote=redis_server.url, remote_bytes=10**9).close()
    client.zadd("hfnc#lru:inference:x", {"hfnc:inference:x:0:k": 1.0})
    client.xadd("hfnc#log:semantic:x:embedder", {"a": "b"})
    code, out, _ = run(capsys, "clear", redis_server.url, "--namespace", "team a")
    assert code == 0 and "removed 2 entries and 0 bookkeeping and log keys" in out
    assert not keys(client, "hfnc:inference:team%20a:*") and len(keys(client, "hfnc:inference::*")) == 4
    code, out, _ = run(capsys, "clear", redis_server.url)
    assert code == 0 and "removed 6 entries and 2 bookkeeping and log keys" in out
    assert keys(client) == {*FOREIGN, "myhash"}
    code, out, _ = run(capsys, "ls", redis_server.url)
    assert code == 0 and out == f"no entries under 'hfnc' at {redis_server.url}\n"


@pytest.mark.parametrize("action", ["stats", "ls", "prune", "clear"])
def test_unreachable_server_is_one_line_without_credentials(action, capsys):
    from redis_helpers import free_port

    pytest.importorskip("redis")
    port = free_port()
    code, out, err = run(capsys, action, f"redis://alice:hunter2@127.0.0.1:{port}/0", "--timeout", "1")
    assert code == 2 and not out and len(err.splitlines()) == 1
    assert f"cannot use the Redis server redis://***@127.0.0.1:{port}/0" in err
    assert "hunter2" not in err and "alice" not in err and "Traceback" not in err


def test_credentials_from_the_environment_are_used_and_never_shown(model, tmp_path, redis_server, capsys, monkeypatch):
    fill(model, tmp_path, redis_server)
    redis_server.client().config_set("requirepass", "s3cretpass")
    monkeypatch.setenv("HF_NEURALCACHE_REDIS_PASSWORD", "s3cretpass")
    code, out, _ = run(capsys, "stats", redis_server.url)
    assert code == 0 and "total: 8 entries" in out and "s3cretpass" not in out
    monkeypatch.setenv("HF_NEURALCACHE_REDIS_PASSWORD", "wrongpass")
    code, out, err = run(capsys, "ls", redis_server.url)
    assert code == 2 and "cannot use the Redis server" in err and "wrongpass" not in err + out


def test_redis_flags_are_refused_for_a_folder(tmp_path, capsys):
    code, _, err = run(capsys, "ls", str(tmp_path), "--kind", "prefix")
    assert code == 2 and "--kind only apply to a Redis URL" in err


def test_prune_checks_entries_as_a_cache_with_the_secret_would(redis_server, capsys, monkeypatch):
    from hf_neuralcache.hooks.storage import encode_entry

    client = redis_server.client()
    tensors = {"sequences": torch.zeros(1, 3, dtype=torch.long)}
    made = {
        "good": encode_entry("good", tensors, {}, secret=b"s3cret"),
        "expired": encode_entry("expired", tensors, {"expires_at": time.time() - 10}, secret=b"s3cret"),
        "nomac": encode_entry("nomac", tensors, {}),
        "other": encode_entry("elsewhere", tensors, {}, secret=b"s3cret"),  # names another key
    }
    for key, blob in made.items():
        client.set(f"hfnc:semantic:ns:0123456789abcdef:{key}", blob)
    client.hset("hfnc:semantic:ns:0123456789abcdef:hash", "f", "v")  # not a string
    code, out, _ = run(capsys, "ls", redis_server.url)
    assert code == 0 and out.count("unreadable") == 3  # another key, a hash, and the listed line
    assert "a Redis hash, not an entry" in out and "the entry names another key" in out
    monkeypatch.setenv("HF_NEURALCACHE_SECRET", "s3cret")
    code, out, _ = run(capsys, "prune", redis_server.url)
    assert code == 0 and "semantic 'ns': removed 1 expired, 3 bad and 0 evicted entries; 1 left" in out
    assert keys(client) == {"hfnc:semantic:ns:0123456789abcdef:good"}
