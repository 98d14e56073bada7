"""VectorIndex: a saved index is checked before hnswlib reads it (edited files, a fuzz run in a child process, special
files, index.json shapes, the HMAC) and the save lock survives a killed holder and storage errors."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import struct
import time
from pathlib import Path

import diskcache
import hnswlib
import numpy as np
import pytest
import xxhash

from hf_neuralcache.hooks.storage import SafeDisk
from hf_neuralcache.semantic.index import VectorIndex

DIM, M, EF_CONSTRUCTION = 8, 4, 16
HEADER = struct.Struct("<6Q i I 3Q d Q")  # hnswlib 0.8's saveIndex header: 96 bytes


def new_index(folder, **kwargs) -> VectorIndex:
    return VectorIndex(folder, DIM, "fuzz-embedder", M, EF_CONSTRUCTION, 16, capacity=64, **kwargs)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def saved_index(folder, n: int = 40, **kwargs) -> tuple[bytes, dict]:
    """Save an index of `n` vectors (labels 100...; two marked deleted) and return `index.bin` and `index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    index = new_index(folder, **kwargs)
    index.add(list(range(100, 100 + n)), vectors(n))
    if n > 6:
        index.remove(103)
        index.remove(106)
    with diskcache.Cache(str(folder / "lock")) as lock:
        assert index.save(lock) is True
    return (folder / "index.bin").read_bytes(), json.loads((folder / "index.json").read_text())


def write(folder, data: bytes, info: dict, checksum: bool = True) -> None:
    """Write an edited `index.bin` with its checksum recomputed, as anyone who can write the folder could."""
    (folder / "index.bin").write_bytes(data)
    if checksum:
        info = {**info, "checksum": xxhash.xxh3_128_hexdigest(data)}
    (folder / "index.json").write_text(json.dumps(info))


def usable(index: VectorIndex) -> None:
    """Queries and additions work on a loaded index (what a crash would hit first)."""
    for vector in vectors(5, seed=1):
        index.search(vector, 5)
    index.add([10_000], vectors(1, seed=2))
    index.search(vectors(1, seed=2)[0], 3)


def mutate(data: bytes, rng: np.random.Generator, header: tuple) -> bytes:
    """One random edit: byte flips, a truncation or extension, a header field or a link / level edit."""
    buf = bytearray(data)
    count, sdpe, max_m0 = header[2], header[3], header[9]
    level0 = HEADER.size
    kind = rng.integers(7)
    if kind == 0:  # flip 1-4 random bytes anywhere
        for at in rng.integers(len(buf), size=rng.integers(1, 5)):
            buf[at] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate or extend
        cut = int(rng.integers(len(buf)))
        return bytes(buf[:cut]) if rng.random() < 0.7 else bytes(buf) + bytes(rng.integers(256, size=cut % 64 + 1))
    elif kind == 2:  # one header field set to a boundary or random value
        field = int(rng.integers(13))
        values = list(HEADER.unpack_from(buf))
        pick = [0, 1, 2**31, 2**32 - 1, int(rng.integers(0, 2**16)), values[field] + int(rng.integers(-3, 4))]
        value = pick[int(rng.integers(len(pick)))]
        if field == 6:
            value = int(np.clip(value, -(2**31), 2**31 - 1))
        elif field == 7:
            value %= 2**32
        elif field == 11:
            value = float(value) if rng.random() < 0.5 else float("nan")
        else:
            value = abs(value) % 2**64
        values[field] = value
        HEADER.pack_into(buf, 0, *values)
    elif kind == 3:  # a level-0 neighbour id or neighbour count
        element = int(rng.integers(count))
        at = level0 + element * sdpe
        if rng.random() < 0.5:
            slot = int(rng.integers(max_m0))
            struct.pack_into("<I", buf, at + 4 + 4 * slot, int(rng.choice([count, count + 7, 2**31, 2**32 - 1])))
        else:
            struct.pack_into("<H", buf, at, int(rng.choice([max_m0 + 1, 2**15, 2**16 - 1])))
    elif kind == 4:  # a label duplicated or a vector made non-finite
        a, b = (level0 + int(e) * sdpe for e in rng.integers(count, size=2))
        if rng.random() < 0.5:
            buf[b + sdpe - 8 : b + sdpe] = buf[a + sdpe - 8 : a + sdpe]
        else:
            struct.pack_into("<f", buf, a + 4 + 4 * max_m0, float(rng.choice([np.nan, np.inf])))
    elif kind == 5:  # an upper-level link list: its size or one id
        at, sizes = level0 + count * sdpe, []
        for _ in range(count):
            (size,) = struct.unpack_from("<I", buf, at)
            sizes.append((at, size))
            at += 4 + size
        at, size = [s for s in sizes if s[1]][int(rng.integers(len([s for s in sizes if s[1]])))]
        if rng.random() < 0.5:
            struct.pack_into("<I", buf, at, int(rng.choice([size + 4, size * 2, 2**31])))
        else:
            word = int(rng.integers(size // 4))
            struct.pack_into("<I", buf, at + 4 + 4 * word, int(rng.choice([0, 1, count - 1, count, 2**32 - 1])))
    else:  # the enter point or the top level
        struct.pack_into("<I" if rng.random() < 0.5 else "<i", buf, 52 if rng.random() < 0.5 else 48,
                         int(rng.integers(0, count + 3)))  # fmt: skip
    return bytes(buf)


def fuzz(folder: str, trials: int, seed: int, out) -> None:
    """In a child process: `trials` edited files, each loaded; a crash kills the child (a non-zero exit code)."""
    folder = Path(folder)
    data, info = (folder / "index.bin").read_bytes(), json.loads((folder / "index.json").read_text())
    header, rng = HEADER.unpack_from(data), np.random.default_rng(seed)
    tally = {"trials": 0, "refused": 0, "loaded": 0}
    logging.disable(logging.WARNING)
    for _ in range(trials):
        write(folder, mutate(data, rng, header), info)
        index = new_index(folder)
        if index.load():
            usable(index)
            tally["loaded"] += 1
        else:
            assert index.index.get_current_count() == 0 and not index.labels
            tally["refused"] += 1
        tally["trials"] += 1
    out.put(tally)


def test_edited_index_files_never_crash_the_process(tmp_path):
    """200 edits of a real index.bin with the checksum recomputed: each load refuses or gives a usable index."""
    saved_index(tmp_path / "s")
    context = multiprocessing.get_context("fork")  # the child inherits the imports: no 8 s start
    out = context.Queue()
    child = context.Process(target=fuzz, args=(str(tmp_path / "s"), 200, 11, out))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, f"the fuzz child died with exit code {child.exitcode} (-11 is SIGSEGV)"
    tally = out.get(timeout=5)
    print("fuzz tally:", tally)
    assert tally["trials"] == 200 and tally["refused"] > 100 and tally["loaded"] > 0


def test_a_saved_index_passes_its_checks_and_hnswlib_reads_a_private_copy(tmp_path, monkeypatch):
    saved_index(tmp_path / "s")
    seen = []
    original = hnswlib.Index.load_index

    def load_index(self, path, **kwargs):
        seen.append(path)
        return original(self, path, **kwargs)

    monkeypatch.setattr(hnswlib.Index, "load_index", load_index)
    index = new_index(tmp_path / "s")
    assert index.load() and index.labels == set(range(100, 140))  # deleted ones too
    assert index.search(vectors(40)[7], 1)[0][0] == 107
    assert seen and not seen[0].startswith(str(tmp_path)) and not os.path.exists(seen[0])  # a removed private copy
    empty = tmp_path / "empty"
    saved_index(empty, n=0)
    assert new_index(empty).load() and not new_index(empty).labels


@pytest.mark.parametrize(
    "edit",
    ["dim", "M", "neighbour", "level", "entry", "duplicate-label", "nan", "truncated", "extended", "capacity"],
)
def test_each_structural_edit_is_refused_with_its_reason(tmp_path, caplog, edit):
    data, info = saved_index(tmp_path / "s")
    buf, header = bytearray(data), HEADER.unpack_from(data)
    count, sdpe = header[2], header[3]
    reasons = {"dim": "size_data_per_element", "M": "maxM", "neighbour": "level-0 neighbour id out of range",
               "level": "upper links", "entry": "enter point", "duplicate-label": "label used twice",
               "nan": "not finite", "truncated": "bytes", "extended": "bytes", "capacity": "capacity"}  # fmt: skip
    if edit == "dim":
        struct.pack_into("<Q", buf, 24, sdpe + 4)
    elif edit == "M":
        struct.pack_into("<Q", buf, 56, M + 1)
    elif edit == "neighbour":
        struct.pack_into("<H", buf, HEADER.size + 5 * sdpe, 1)
        struct.pack_into("<I", buf, HEADER.size + 5 * sdpe + 4, count)
    elif edit == "level":
        at = HEADER.size + count * sdpe
        struct.pack_into("<I", buf, at, 3)
    elif edit == "entry":
        struct.pack_into("<I", buf, 52, next(i for i in range(count) if i != header[7]))
    elif edit == "duplicate-label":
        buf[HEADER.size + 2 * sdpe - 8 : HEADER.size + 2 * sdpe] = buf[HEADER.size + sdpe - 8 : HEADER.size + sdpe]
    elif edit == "nan":
        struct.pack_into("<f", buf, HEADER.size + 4 + 4 * 2 * M, float("nan"))
    elif edit == "truncated":
        del buf[-3:]
    elif edit == "extended":
        buf += b"\0" * 4
    elif edit == "capacity":
        info = {**info, "capacity": info["capacity"] + 1}
    write(tmp_path / "s", bytes(buf), info)
    index = new_index(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        assert index.load() is False
    assert "unusable" in caplog.text and reasons[edit] in caplog.text, caplog.text
    assert index.index.get_current_count() == 0 and not index.labels


def test_only_regular_files_of_bounded_size_are_read(tmp_path, caplog):
    data, info = saved_index(tmp_path / "s")
    folder = tmp_path / "s"
    for name in ("index.bin", "index.json"):
        for kind in ("zero", "fifo", "link", "folder"):
            write(folder, data, info)
            path = folder / name
            path.unlink()
            if kind == "zero":
                path.symlink_to("/dev/zero")
            elif kind == "fifo":
                os.mkfifo(path)  # nobody writes it: a blocking open would hang
            elif kind == "link":
                (tmp_path / f"elsewhere-{name}").write_bytes(data if name == "index.bin" else json.dumps(info).encode())
                path.symlink_to(tmp_path / f"elsewhere-{name}")
            else:
                path.mkdir()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
                assert new_index(folder).load() is False, (name, kind)
            assert "unusable" in caplog.text, (name, kind)
            path.rmdir() if kind == "folder" else path.unlink()
    write(folder, data + bytes(len(data) * 64), info)  # far larger than its header allows: not even read
    assert new_index(folder).load() is False


@pytest.mark.parametrize(
    "text",
    ["[]", "null", '"index"', "[" * 100_000, "{" * 50_000, "\xff\xfe", "{}", "nonsense", " " * 70_000 + "{}",
     "dim-as-str", "capacity-as-bool", "checksum-as-int"],
)  # fmt: skip
def test_index_json_must_be_an_object_with_the_expected_fields(tmp_path, caplog, text):
    data, info = saved_index(tmp_path / "s")
    edited = {"dim-as-str": {**info, "dim": str(DIM)}, "capacity-as-bool": {**info, "capacity": True},
              "checksum-as-int": {**info, "checksum": 1}}  # fmt: skip
    raw = json.dumps(edited[text]).encode() if text in edited else text.encode("latin-1")
    (tmp_path / "s" / "index.json").write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        assert new_index(tmp_path / "s").load() is False
    assert "unusable" in caplog.text


def test_with_a_secret_only_an_index_with_a_valid_mac_is_loaded(tmp_path, caplog):
    data, info = saved_index(tmp_path / "s", secret=b"k" * 32)
    assert len(info["mac"]) == 64 and new_index(tmp_path / "s", secret=b"k" * 32).load()
    assert new_index(tmp_path / "s").load()  # without the key the checksum is still checked
    buf = bytearray(data)
    struct.pack_into("<f", buf, HEADER.size + 4 + 4 * 2 * M, 0.5)  # a forged vector, structurally valid
    write(tmp_path / "s", bytes(buf), info)  # checksum recomputed, MAC left
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        assert new_index(tmp_path / "s", secret=b"k" * 32).load() is False
    assert "MAC mismatch" in caplog.text
    assert new_index(tmp_path / "s").load()  # unkeyed: nothing to tell the forgery by
    without = {k: v for k, v in info.items() if k != "mac"}
    write(tmp_path / "s", data, without)
    assert new_index(tmp_path / "s", secret=b"k" * 32).load() is False  # a MAC is required
    write(tmp_path / "s", data, info)
    assert new_index(tmp_path / "s", secret=b"other key").load() is False
    with pytest.raises(ValueError, match="expected secret to be non-empty bytes"):
        new_index(tmp_path / "s", secret="text")


def hold_lock(folder: str, ready, release) -> None:
    """In a child process: take the save lock, say so, and keep it until `release` is set (or the child is killed)."""
    from hf_neuralcache.semantic.index import _FolderLock

    with diskcache.Cache(folder, disk=SafeDisk) as cache:
        lock = _FolderLock(cache)
        assert lock.acquire(5.0)
        ready.set()
        release.wait(60)
        lock.release()


@pytest.fixture
def holder(tmp_path):
    """Start a child holding the save lock of `tmp_path / "lock"`; yields the child (killed at the end)."""
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    child = context.Process(target=hold_lock, args=(str(tmp_path / "lock"), ready, release))
    child.start()
    assert ready.wait(30)
    child.release = release
    yield child
    child.kill()
    child.join()


def timed_save(index: VectorIndex, lock_folder, **kwargs) -> tuple[bool, float]:
    with diskcache.Cache(str(lock_folder), disk=SafeDisk) as cache:
        start = time.monotonic()
        saved = index.save(cache, **kwargs)
        return saved, time.monotonic() - start


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_killed_lock_holder_is_taken_over_at_once(tmp_path, holder, caplog, reaped):
    index = new_index(tmp_path / "s")
    (tmp_path / "s").mkdir()
    index.add([1, 2], vectors(2))
    os.kill(holder.pid, signal.SIGKILL)
    if reaped:
        holder.join()
    else:  # killed and not waited for: a zombie, whose PID still answers kill(pid, 0)
        while "Z" not in Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1][:3]:
            time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        saved, seconds = timed_save(index, tmp_path / "lock", wait=False)
    assert saved and seconds < 1.0, seconds
    assert f"PID {holder.pid}, has exited" in caplog.text
    assert new_index(tmp_path / "s").load()


def test_a_live_holder_makes_save_skip_or_wait_a_bounded_time(tmp_path, holder, monkeypatch):
    index = new_index(tmp_path / "s")
    (tmp_path / "s").mkdir()
    saved, seconds = timed_save(index, tmp_path / "lock", wait=False)
    assert not saved and seconds < 0.5, seconds
    monkeypatch.setattr(VectorIndex, "lock_seconds", 0.4)
    saved, seconds = timed_save(index, tmp_path / "lock")
    assert not saved and 0.4 <= seconds < 1.5, seconds
    assert not (tmp_path / "s" / "index.bin").exists()
    holder.release.set()
    holder.join()
    assert timed_save(index, tmp_path / "lock")[0] and new_index(tmp_path / "s").load()


@pytest.mark.parametrize("value", ["garbage", "pickle", "other-host", "legacy-pid"])
def test_lock_values_not_written_by_a_live_local_holder(tmp_path, value):
    """Garbage or a planted pickle is no lock: taken over. Another host's holder or an older version's PID: waited
    for (the key expires)."""
    index = new_index(tmp_path / "s")
    (tmp_path / "s").mkdir()
    with diskcache.Cache(str(tmp_path / "lock")) as plain:  # diskcache's default Disk: it can plant a pickle
        planted = {"garbage": "not json", "pickle": ("a", "tuple"), "legacy-pid": os.getpid() + 1,
                   "other-host": json.dumps({"host": "elsewhere", "ns": "", "pid": 1, "start": None})}  # fmt: skip
        plain.set("semantic-index-save", planted[value], expire=60)
    saved, seconds = timed_save(index, tmp_path / "lock", wait=False)
    assert saved == (value in ("garbage", "pickle")) and seconds < 1.0


class Failing:
    """A lock cache whose every call fails with `error` (a full disk, a broken database, a busy one)."""

    directory = "nowhere"

    def __init__(self, error):
        self.error = error

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise self.error

        return fail


@pytest.mark.parametrize(
    "error", [sqlite3.OperationalError("disk I/O error"), diskcache.Timeout("busy"), OSError(28, "No space left")]
)
def test_storage_errors_while_saving_are_logged_not_raised(tmp_path, caplog, error):
    index = new_index(tmp_path / "s")
    (tmp_path / "s").mkdir()
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        assert index.save(Failing(error), wait=False) is False
    assert ("could not save" in caplog.text) != isinstance(error, diskcache.Timeout)  # busy: skipped, not broken
    with caplog.at_level(logging.WARNING, logger="hf_neuralcache.semantic"):
        gone = new_index(tmp_path / "gone")  # the folder was removed: nowhere to write
        assert gone.save(diskcache.Cache(str(tmp_path / "lock"))) is False
    assert "could not save" in caplog.text and not os.listdir(tmp_path / "s")
    with diskcache.Cache(str(tmp_path / "lock")) as cache:
        assert "semantic-index-save" not in cache  # the lock was released after the failure
