"""SemanticCache reliability: index growth and persistence, eviction, crashes, corruption, pickle, processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import diskcache
import pytest
from semantic_helpers import consistent, make, served, store, worker

from hf_neuralcache.models import tiny_model
from hf_neuralcache.semantic import LookAlikeGuard
from hf_neuralcache.semantic.cache import SemanticCache


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def strict(path, **kwargs):
    return make(path, guard=LookAlikeGuard("strict"), **kwargs)


def test_the_index_grows_past_its_capacity_saves_and_reloads(model, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(SemanticCache, "initial_capacity", 4)
    cache = strict(tmp_path / "s", M=8, ef_construction=40, ef=16)
    for n in range(100, 140):
        store(cache, model, n)
    assert cache.index.index.get_max_elements() >= 40 and (cache.index.M, cache.index.ef) == (8, 16)
    assert [served(cache, model, n) for n in range(100, 140)] == list(range(100, 140))
    cache.close()
    info = json.loads((tmp_path / "s" / "index.json").read_text())
    assert info["capacity"] >= 40 and (info["M"], info["ef_construction"]) == (8, 40)
    reopened = strict(tmp_path / "s", M=8, ef_construction=40, ef=16)
    assert reopened.index.index.get_current_count() == 40 and reopened.stats()["entries"] == 40
    assert [served(reopened, model, n) for n in range(100, 140)] == list(range(100, 140))
    consistent(reopened)
    reopened.close()
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        other = strict(tmp_path / "s", M=12)  # other build settings: rebuilt from the answers
    assert "unusable (built with" in caplog.text and other.index.M == 12
    assert [served(other, model, n) for n in range(100, 140)] == list(range(100, 140))


def test_evictions_by_count_bytes_and_ttl_keep_index_records_and_store_in_step(model, tmp_path):
    by_count = strict(tmp_path / "count", max_entries=3)
    for n in range(100, 106):
        store(by_count, model, n)
    assert by_count.stats()["entries"] == 3
    assert [served(by_count, model, n) for n in (102, 103, 105)] == [None, 103, 105]
    consistent(by_count)
    # answers of 20,000 tokens (160 kB, kept as files): the byte bound holds about four of them
    by_bytes = strict(tmp_path / "bytes", disk_bytes=800_000)
    for n in range(100, 110):
        store(by_bytes, model, n, length=20_000)
    kept = by_bytes.stats()["entries"]
    assert 1 <= kept < 10 and len(by_bytes.store) == kept
    consistent(by_bytes)
    assert served(by_bytes, model, 109) == 109 and served(by_bytes, model, 100) is None
    by_ttl = strict(tmp_path / "ttl", ttl=0.3)
    for n in range(100, 103):
        store(by_ttl, model, n)
    assert served(by_ttl, model, 101) == 101
    time.sleep(0.5)
    assert by_ttl.stats()["entries"] == 0 and served(by_ttl, model, 101) is None
    consistent(by_ttl)


def test_delete_removes_one_request_in_its_own_namespace_only(model, tmp_path):
    a, b = strict(tmp_path / "s", namespace="a"), strict(tmp_path / "s", namespace="b")
    for cache in (a, b):
        store(cache, model, 100)
        store(cache, model, 101)
    assert a.delete("explain x100") == 1 and a.delete("explain x100") == 0
    b.refresh_seconds = 0.0
    assert served(a, model, 100) is None and served(a, model, 101) == 101 and served(b, model, 100) == 100
    consistent(a)
    with pytest.raises(ValueError, match="expected the request text as a str"):
        a.delete(100)


def test_a_crash_between_the_two_writes_is_repaired(model, tmp_path, monkeypatch):
    monkeypatch.setattr(SemanticCache, "pending_seconds", 0.3)
    cache = strict(tmp_path / "s")
    store(cache, model, 100)

    def crash(self, label, record):
        raise KeyboardInterrupt("the process died after writing the answer, before its record")

    with monkeypatch.context() as m:
        m.setattr("hf_neuralcache.semantic.records.LabelRecords.commit", crash)
        with pytest.raises(KeyboardInterrupt):
            store(cache, model, 101)
    fresh = strict(tmp_path / "s")  # another process, right after the crash: waits for the pending label
    fresh.refresh_seconds = 0.0
    assert len(fresh.store) == 2 and fresh.stats()["entries"] == 1 and fresh._unrecorded
    assert served(fresh, model, 101) is None and served(fresh, model, 100) == 100
    time.sleep(0.4)
    served(fresh, model, 100)
    assert not fresh._unrecorded  # given up on the dead writer's label
    store(fresh, model, 101)  # the orphan answer does not block storing the request again
    assert served(fresh, model, 101) == 101
    consistent(fresh)
    # a crash in a removal, after the answer went and before its record did: the record is dropped on open
    fresh.close()
    reopened = strict(tmp_path / "s")
    first = min(reopened._labels)
    reopened.store.delete(reopened._labels[first]["key"])
    reopened.close()
    again = strict(tmp_path / "s")
    assert first not in again._labels and again.stats()["entries"] == 1
    consistent(again)


def test_a_stale_index_never_serves_another_requests_answer(model, tmp_path, caplog):
    cache = make(tmp_path / "s", guard="off")
    store(cache, model, 100)
    store(cache, model, 101)
    cache.close()
    records = cache.records.read_all()
    first, second = sorted(records)
    cache.records.commit(first, records[second])  # label 100's vector now points at the answer of 101
    stale = make(tmp_path / "s", guard="off")
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        assert served(stale, model, 100) is None
    assert "does not match its answer; dropped" in caplog.text
    assert served(stale, model, 101) == 101


def test_bad_entries_and_unreadable_databases_are_misses_with_a_warning(model, tmp_path, caplog):
    cache = strict(tmp_path / "s")
    store(cache, model, 100)
    store(cache, model, 101)
    key = cache._labels[min(cache._labels)]["key"]
    cache.store.disk.set(key, b"HFNC\x01" + bytes(40), retry=True)  # damaged in place
    with caplog.at_level(logging.WARNING):
        assert served(cache, model, 100) is None
    assert "semantic cache" in caplog.text and "checksum mismatch" in caplog.text and cache.stats()["entries"] == 1
    consistent(cache)
    cache.close()
    for name in ("entries", "meta"):
        (tmp_path / "s" / name / "cache.db").write_bytes(b"not a database" * 100)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            broken = strict(tmp_path / "s")
        assert "is unreadable" in caplog.text and "starting empty" in caplog.text
        assert served(broken, model, 101) is None and broken.stats()["entries"] == 0
        store(broken, model, 101)
        assert served(broken, model, 101) == 101
        broken.close()


class Planted:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickles_planted_in_the_folder_are_never_loaded(model, tmp_path):
    cache = strict(tmp_path / "s")
    store(cache, model, 100)
    cache.close()
    proof = tmp_path / "unpickled"
    plain = diskcache.Cache(str(tmp_path / "s" / "meta"))  # diskcache's default Disk pickles
    for name in ("next_label", "label:7", ("label", 8)):
        plain.set(name, Planted(str(proof)))
    plain.close()
    entries = diskcache.Cache(str(tmp_path / "s" / "entries"))
    entries.set("planted", Planted(str(proof)))
    entries.close()
    reopened = strict(tmp_path / "s")
    store(reopened, model, 101)
    assert served(reopened, model, 100) == 100 and served(reopened, model, 101) == 101
    assert not proof.exists()


def test_processes_sharing_a_folder_never_serve_a_wrong_answer(model, tmp_path):
    """Three processes store and look up at once (forked: a fresh interpreter would spend ~10 s importing torch)."""
    folder, count, workers = str(tmp_path / "s"), 12, 3
    everyone = list(range(100, 100 + count * workers))
    jobs = []
    for w in range(workers):
        mine = everyone[w * count : (w + 1) * count]
        jobs.append((folder, mine[0], count, [n for n in everyone if n not in mine]))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.starmap(worker, jobs)
    assert len({r["pid"] for r in results} | {os.getpid()}) == workers + 1
    assert all(r["wrong"] == [] for r in results) and sum(r["hits"] for r in results) > 0
    merged = strict(folder)
    assert merged.stats()["entries"] == len(everyone)
    assert [served(merged, model, n) for n in everyone] == everyone
    consistent(merged)
