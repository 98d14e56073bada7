"""Reliability of the hooks' storage: bad entries, planted pickles, killed writers, concurrent processes, bounds."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import diskcache
import pytest
import torch

from hf_neuralcache import InferenceCache, PrefixCache
from hf_neuralcache.hooks.storage import CorruptEntryError, TieredStore, decode_entry, encode_entry
from hf_neuralcache.models import tiny_model

CT = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def prompt(seed=0, n=3 * CT + 2):
    return torch.randint(5, 120, (1, n), generator=torch.Generator().manual_seed(seed))


def test_entry_round_trip_and_every_check():
    tensors = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    blob = encode_entry("k1", tensors, {"note": "x"})
    got, meta = decode_entry("k1", blob)
    assert meta["note"] == "x" and all(torch.equal(got[n], t) for n, t in tensors.items())
    flipped = bytearray(blob)
    flipped[-3] ^= 0x10
    for bad, message in [
        (blob[:-5], "checksum"),
        (bytes(flipped), "checksum"),
        (b"XXXX" + blob[4:], "not an hf_neuralcache entry"),
        (blob[:4] + bytes([9]) + blob[5:], "storage version"),
        (b"", "not an hf_neuralcache entry"),
    ]:
        with pytest.raises(CorruptEntryError, match=message):
            decode_entry("k1", bad)
    with pytest.raises(CorruptEntryError, match="read under"):
        decode_entry("k2", blob)


def _damage_every_entry(directory: Path, how: str) -> int:
    """Truncate or flip a byte of every stored value, inline (SQLite) or in its own file."""
    damaged = 0
    db = sqlite3.connect(directory / "entries" / "cache.db")
    for rowid, filename, value in db.execute("SELECT rowid, filename, value FROM Cache").fetchall():
        if filename:
            path = directory / "entries" / filename
            data = bytearray(path.read_bytes())
            data = data[: len(data) // 2] if how == "truncate" else data[:-7] + bytes([data[-7] ^ 1]) + data[-6:]
            path.write_bytes(bytes(data))
        else:
            data = bytearray(value)
            data = data[: len(data) // 2] if how == "truncate" else data[:-7] + bytes([data[-7] ^ 1]) + data[-6:]
            db.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bytes(data), rowid))
        damaged += 1
    db.commit()
    db.close()
    return damaged


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_entries_are_misses_deleted_and_logged(model, tmp_path, caplog, how):
    x = prompt(seed=1)
    ref = model.generate(x, max_new_tokens=5, do_sample=False)
    writer = PrefixCache(tmp_path / "p", chunk_tokens=CT)
    model.generate(x, max_new_tokens=1, prefix_cache=writer)
    inference = InferenceCache(tmp_path / "i")
    model.generate(x, max_new_tokens=5, do_sample=False, inference_cache=inference)
    assert _damage_every_entry(tmp_path / "p", how) == 3 and _damage_every_entry(tmp_path / "i", how) == 1
    reader = PrefixCache(tmp_path / "p", chunk_tokens=CT, ram_bytes=0)
    fresh = InferenceCache(tmp_path / "i", ram_bytes=0)
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.hooks"):
        assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False, prefix_cache=reader), ref)
        assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False, inference_cache=fresh), ref)
    assert "prefix cache" in caplog.text and "inference cache" in caplog.text and "checksum mismatch" in caplog.text
    assert reader.stats()["integrity_errors"] >= 1 and reader.stats()["hits"] == 0
    assert fresh.stats()["integrity_errors"] == 1 and fresh.stats()["misses"] == 1


class Planted:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_is_never_loaded(model, tmp_path):
    x = prompt(seed=2)
    cache = PrefixCache(tmp_path / "p", chunk_tokens=CT)
    model.generate(x, max_new_tokens=1, prefix_cache=cache)
    keys = list(cache.store.keys())
    cache.close()
    marker = tmp_path / "pwned"
    plain = diskcache.Cache(str(tmp_path / "p" / "entries"))  # diskcache's default Disk pickles
    for key in keys:
        plain.set(key, Planted(marker))
    plain.set(Planted(marker), b"a pickled key")
    plain.close()
    (tmp_path / "p" / "evil.pkl").write_bytes(b"\x80\x04")  # a stray pickle file is just ignored
    reader = PrefixCache(tmp_path / "p", chunk_tokens=CT, ram_bytes=0)
    ref = model.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(x, max_new_tokens=4, do_sample=False, prefix_cache=reader), ref)
    assert all(isinstance(key, str) for key in reader.store.keys())  # the pickled key row is skipped, not loaded
    assert not marker.exists()
    assert reader.stats()["integrity_errors"] >= 1


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from hf_neuralcache.hooks.storage import TieredStore
    store = TieredStore(sys.argv[1], "prefix", 1 << 34, 0, "least-recently-used")
    big = torch.randn(1 << 19)  # 2 MiB entries, each in its own file
    i = 0
    while True:
        store.put(f"entry-{i}", {"x": big + i}, {"i": i})
        i += 1
        print(i, flush=True)
    """
)


def test_a_writer_killed_mid_write_leaves_a_readable_cache(tmp_path):
    command = [sys.executable, "-P", "-c", _WRITER, str(tmp_path / "s")]  # -P: not the checkout's kernels/ folder
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # let it finish a few entries, then kill it in the middle of the next ones
        proc.stdout.readline()
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = TieredStore(tmp_path / "s", "prefix", 1 << 34, 0, "least-recently-used")
    keys = list(store.keys())
    assert len(keys) >= 5
    for key in keys:
        entry = store.get(key)
        if entry is not None:  # a complete entry is exact; an incomplete one is never served
            assert entry.tensors["x"].shape == (1 << 19,) and key == f"entry-{entry.meta['i']}"
    assert sum(store.get(k) is not None for k in keys) >= 5


_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from hf_neuralcache import InferenceCache, PrefixCache
    from hf_neuralcache.models import tiny_model
    model = tiny_model("llama")
    # cost_check=False: on a loaded machine, reading a chunk can be measured slower than recomputing the tiny
    # model's prefill, and the cost check then rightly recomputes (a miss); this test is about sharing the folder
    prefix = PrefixCache(sys.argv[1] + "/prefix", chunk_tokens=8, cost_check=False)
    inference = InferenceCache(sys.argv[1] + "/inference")
    outputs = []
    for i in range(50):
        seed = i % 5
        x = torch.randint(5, 120, (1, 26), generator=torch.Generator().manual_seed(seed))
        kwargs = dict(max_new_tokens=4, do_sample=False)
        cache = dict(inference_cache=inference) if i % 2 else dict(prefix_cache=prefix)
        outputs.append([seed, model.generate(x, **kwargs, **cache).tolist()])
    print(json.dumps({"outputs": outputs, "prefix": prefix.stats(), "inference": inference.stats()}))
    """
)


def test_four_processes_share_one_directory(model, tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-P", "-c", _WORKER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    refs = {}
    for seed in range(5):
        x = torch.randint(5, 120, (1, 26), generator=torch.Generator().manual_seed(seed))
        refs[seed] = model.generate(x, max_new_tokens=4, do_sample=False).tolist()
    for result in results:
        assert all(out == refs[seed] for seed, out in result["outputs"])
        assert result["inference"]["hits"] + result["inference"]["misses"] == 25
        assert result["inference"]["misses"] <= 5 and result["prefix"]["misses"] <= 5
        assert result["prefix"]["skipped_by_cost"] == 0
        assert result["inference"]["integrity_errors"] == 0 and result["prefix"]["integrity_errors"] == 0
    totals = TieredStore(tmp_path / "inference", "inference", 1 << 30, 0, "least-recently-used").read_record("stats")
    assert totals["hits"] + totals["misses"] == 100


def test_store_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="disk_bytes must be an int >= 0"):
        TieredStore(tmp_path / "a", "prefix", -1, 0, "least-recently-used")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "hf_neuralcache.json").write_text("{nope")  # damaged: written again, the folder is used
    assert not TieredStore(tmp_path / "b", "prefix", 1 << 20, 0, "least-recently-used").readonly
    assert json.loads((tmp_path / "b" / "hf_neuralcache.json").read_text())["kind"] == "prefix"
    with pytest.raises(ValueError, match="holds a 'prefix' cache"):
        TieredStore(tmp_path / "b", "inference", 1 << 20, 0, "least-recently-used")


def test_an_unreadable_database_is_moved_aside(model, tmp_path, caplog):
    x = prompt(seed=3)
    cache = InferenceCache(tmp_path / "i")
    ref = model.generate(x, max_new_tokens=3, inference_cache=cache)
    cache.close()
    (tmp_path / "i" / "entries" / "cache.db").write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.hooks"):
        fresh = InferenceCache(tmp_path / "i")
    assert "is unreadable" in caplog.text and fresh.stats()["entries"] == 0
    assert list(tmp_path.joinpath("i").glob("entries.unreadable-*"))
    assert torch.equal(model.generate(x, max_new_tokens=3, inference_cache=fresh), ref)
