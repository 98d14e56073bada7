"""The semantic cache's nearest-neighbour index: hnswlib (cosine space) in memory, saved atomically and checked on load.

Two files in the cache folder:

- `index.bin`: hnswlib's own binary format (`save_index` writes the graph links and the float32 vectors as raw
  arrays; it is not pickle). hnswlib trusts that file completely: a neighbour id past the end, a wrong size or a
  level that does not exist makes it read outside its memory and kill the process. So [`VectorIndex.load`] parses the
  whole file first ([`check_hnsw_file`]): every header field equal to what this index builds (`dim`, `M`, sizes and
  offsets), counts within bounds, every neighbour id an element of the index and of the level it is linked on, the
  enter point on the top level, the exact file length, finite vectors, unique labels. Only these checked bytes reach
  hnswlib, copied to a private temporary file (never the folder's path, which another process could swap).
- `index.json`: a JSON object with the xxh3-128 checksum of `index.bin` (it stops accidents, not an attacker, who
  can recompute it) and what the index was built with (embedder fingerprint, dimension, `M`, `ef_construction`) and
  its capacity. With a `secret`, it also carries an HMAC-SHA256 of `index.bin` under that key: an index whose MAC
  does not verify, or has none, is not loaded, so only a holder of the key can plant one.

Both files are read only when they are regular files (not links, FIFOs or devices) of bounded size. An index that
fails any check, or differs in its build settings, is not loaded: the cache rebuilds it from its stored answers and
logs why.

Both files are written to temporary names and renamed, under a lock shared by the processes of the folder, so a
crash or a concurrent save leaves either the old pair or the new one. The lock names its holder (host, PID
namespace, PID and the process's start time): a waiter that finds the holder dead on the same host takes the lock
over at once, and nobody waits more than `VectorIndex.lock_seconds` (`save(..., wait=False)` does not wait at all:
the index only speeds up the next start). A lock whose holder is on another host expires after two minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import socket
import sqlite3
import stat
import struct
import tempfile
import time
import uuid
from pathlib import Path

import diskcache
import hnswlib
import numpy as np
import xxhash

logger = logging.getLogger("hf_neuralcache.semantic")

__all__ = ["VectorIndex", "check_hnsw_file"]

INDEX_FILES = ("index.bin", "index.json")
LOCK_NAME = "semantic-index-save"

# hnswlib 0.8 `saveIndex`: offsetLevel0, max_elements, cur_element_count, size_data_per_element, label_offset,
# offsetData (size_t), maxlevel (int32), enterpoint_node (uint32), maxM, maxM0, M (size_t), mult (double),
# ef_construction (size_t); then the level-0 block of each element; then per element a uint32 byte count and its
# upper-level link lists (each: a uint32 neighbour count, then maxM uint32 ids).
_HEADER = struct.Struct("<6Q i I 3Q d Q")
_MAX_LEVEL = 64  # hnswlib draws levels as floor(-ln(u) / ln(M)) with u >= 2**-31: 31 at most, for M = 2
_MAX_ELEMENTS = 2**31  # element ids are uint32 and hnswlib reads them back as int
_MAX_JSON_BYTES = 1 << 16


def _read_regular(path: Path, limit) -> bytes:
    """Bytes of `path` when it is a regular file (no link, FIFO or device) of at most `limit(head)` bytes.

    `limit` receives the first 96 bytes and returns the largest size the file may have. Raises `OSError` or
    `ValueError`.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        head = file.read(_HEADER.size)
        allowed = limit(head)
        if info.st_size > allowed:
            raise ValueError(f"{path.name} has {info.st_size} bytes, at most {allowed} expected")
        data = head + file.read(allowed + 1 - len(head))
    if len(data) > allowed:
        raise ValueError(f"{path.name} grew past {allowed} bytes while read")
    return data


def _layout(dim: int, M: int) -> dict:  # noqa: N803
    """The sizes and offsets hnswlib derives from `dim` and `M` (bytes)."""
    level0_links = 4 + 4 * 2 * M  # neighbour count + maxM0 ids
    return {"offset_data": level0_links, "label_offset": level0_links + 4 * dim,
            "element": level0_links + 4 * dim + 8, "upper_links": 4 + 4 * M}  # fmt: skip


def _check_header(head: bytes, dim: int, M: int, ef_construction: int, capacity: int) -> tuple:  # noqa: N803
    """The header fields after checking them against what an index of `dim` and `M` writes; `ValueError` if not."""
    if len(head) < _HEADER.size:
        raise ValueError(f"index.bin is {len(head)} bytes, shorter than hnswlib's header")
    fields = _HEADER.unpack_from(head)
    offset0, max_elements, count, element, label_offset, offset_data, top, entry, max_m, max_m0, m, mult, efc = fields
    layout = _layout(dim, M)
    expected = {"offsetLevel0": (offset0, 0), "size_data_per_element": (element, layout["element"]),
                "label_offset": (label_offset, layout["label_offset"]), "offsetData": (offset_data,
                layout["offset_data"]), "maxM": (max_m, M), "maxM0": (max_m0, 2 * M), "M": (m, M),
                "ef_construction": (efc, max(ef_construction, M))}  # fmt: skip
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"index.bin header: {name} is {got}, expected {want}")
    if not math.isclose(mult, 1 / math.log(M), rel_tol=1e-9):
        raise ValueError(f"index.bin header: mult is {mult}, expected {1 / math.log(M)}")
    if not count <= max_elements <= capacity:
        raise ValueError(f"index.bin header: {count} elements and room for {max_elements}, at most {capacity} allowed")
    if count == 0 and (top, entry) != (-1, 2**32 - 1):
        raise ValueError(f"index.bin header: an empty index with top level {top} and enter point {entry}")
    if count and not (0 <= top <= _MAX_LEVEL and entry < count):
        raise ValueError(f"index.bin header: top level {top} and enter point {entry} for {count} elements")
    return fields


def _size_bounds(fields: tuple, dim: int, M: int) -> tuple[int, int]:  # noqa: N803
    """Smallest and largest file length the header allows (every element on level 0 only / on the top level)."""
    count, top, layout = fields[2], max(fields[6], 0), _layout(dim, M)
    least = _HEADER.size + count * (layout["element"] + 4)
    return least, least + count * top * layout["upper_links"]


def check_hnsw_file(data: bytes, dim: int, M: int, ef_construction: int, capacity: int) -> int:  # noqa: N803
    """Check that `data` is an hnswlib 0.8 index file of a cosine index built with `dim` and `M`; its element count.

    Everything hnswlib reads without checking is checked here, so that loading and searching the index cannot read
    outside hnswlib's memory. Deleted elements are allowed.

    Args:
        data (`bytes`): The whole `index.bin`.
        dim (`int`): Length of the vectors.
        M (`int`), ef_construction (`int`): The build settings the index must have been saved with.
        capacity (`int`): The largest room (`max_elements`) accepted.

    Returns:
        `int`: The number of elements (deleted ones included).

    Raises:
        `ValueError`: Naming the first thing that is not as expected.

    Example:

    ```python
    >>> import tempfile, hnswlib, numpy as np
    >>> from hf_neuralcache.semantic.index import check_hnsw_file
    >>> index = hnswlib.Index(space="cosine", dim=4)
    >>> index.init_index(max_elements=8, M=4, ef_construction=16)
    >>> index.add_items(np.eye(4, dtype=np.float32), np.arange(4))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     index.save_index(f"{folder}/index.bin")
    ...     data = open(f"{folder}/index.bin", "rb").read()
    >>> check_hnsw_file(data, dim=4, M=4, ef_construction=16, capacity=8)
    4
    >>> check_hnsw_file(data[:-1], dim=4, M=4, ef_construction=16, capacity=8)
    Traceback (most recent call last):
    ...
    ValueError: index.bin is 1 bytes shorter than its link lists
    ```
    """
    fields = _check_header(data, dim, M, ef_construction, capacity)
    count, top, entry = fields[2], fields[6], fields[7]
    least, most = _size_bounds(fields, dim, M)
    if not least <= len(data) <= most:
        raise ValueError(f"index.bin has {len(data)} bytes, {least} to {most} expected for {count} elements")
    max_m0, upper = 2 * M, _layout(dim, M)["upper_links"]
    element = np.dtype([("count", "<u2"), ("deleted", "u1"), ("spare", "u1"), ("links", "<u4", (max_m0,)),
                        ("vector", "<f4", (dim,)), ("label", "<u8")])  # fmt: skip
    level0 = np.frombuffer(data, dtype=element, count=count, offset=_HEADER.size)
    if (level0["count"] > max_m0).any():
        raise ValueError(f"index.bin: a level-0 neighbour list longer than {max_m0}")
    if ((level0["deleted"] > 1) | (level0["spare"] != 0)).any():
        raise ValueError("index.bin: a level-0 list header with unknown flags")
    used = np.arange(max_m0)[None, :] < level0["count"][:, None]  # [count, maxM0]
    if (level0["links"][used] >= count).any():
        raise ValueError(f"index.bin: a level-0 neighbour id out of range (>= {count})")
    if not np.isfinite(level0["vector"]).all():
        raise ValueError("index.bin: a vector that is not finite")
    if len(np.unique(level0["label"])) != count:
        raise ValueError("index.bin: a label used twice")
    # upper levels: a byte count per element, then its lists; owners / levels / lists gathered, checked at once
    levels = np.zeros(count, dtype=np.int64)
    owners, blocks, at = [], [], _HEADER.size + count * element.itemsize
    for i in range(count):
        if at + 4 > len(data):
            raise ValueError(f"index.bin is {at + 4 - len(data)} bytes shorter than its link lists")
        (size,) = struct.unpack_from("<I", data, at)
        at += 4
        if size:
            if size % upper or not size // upper <= top:
                raise ValueError(f"index.bin: element {i} has {size} bytes of upper links, not 1 to {top} levels")
            if at + size > len(data):
                raise ValueError(f"index.bin is {at + size - len(data)} bytes shorter than its link lists")
            levels[i] = size // upper
            owners.append(i)
            blocks.append(data[at : at + size])
            at += size
    if at != len(data):
        raise ValueError(f"index.bin has {len(data) - at} bytes after its link lists")
    if count and (levels.max() != top or levels[entry] != top):
        raise ValueError(f"index.bin: top level {top}, enter point on level {levels[entry]}, highest {levels.max()}")
    if blocks:
        lists = np.frombuffer(b"".join(blocks), dtype="<u4").reshape(-1, 1 + M)  # [lists, 1 + maxM]
        level = np.concatenate([np.arange(1, levels[i] + 1) for i in owners])  # level of each list
        if (lists[:, 0] > M).any():
            raise ValueError(f"index.bin: an upper-level neighbour list longer than {M} (or with flags)")
        used = np.arange(M)[None, :] < lists[:, :1]
        ids, on = lists[:, 1:][used], np.broadcast_to(level[:, None], used.shape)[used]
        if (ids >= count).any():
            raise ValueError(f"index.bin: an upper-level neighbour id out of range (>= {count})")
        if (levels[ids] < on).any():
            raise ValueError("index.bin: a neighbour linked on a level it does not reach")
    return count


class _FolderLock:
    """A lock shared by the processes of a folder: a diskcache key added atomically, naming its holder.

    The value is JSON: host name, PID namespace, PID, the process's start time (from `/proc`, when there is one),
    the time taken and a random token. A waiter takes over a lock whose holder is dead on the same host; a lock whose
    value is not such a record (unreadable, planted) is removed; the key expires after `expire` seconds anyway.
    """

    def __init__(self, cache: diskcache.Cache, name: str = LOCK_NAME, expire: float = 120.0):
        self.cache, self.name, self.expire = cache, name, expire
        self.value = json.dumps({**_whoami(), "time": time.time(), "token": uuid.uuid4().hex})
        self.held = False

    def acquire(self, wait: float) -> bool:
        """Take the lock within `wait` seconds (0: one try); whether it was taken."""
        deadline, pause = time.monotonic() + max(wait, 0.0), 0.005
        while True:
            with contextlib.suppress(diskcache.Timeout):
                if self.cache.add(self.name, self.value, expire=self.expire, retry=False):
                    self.held = True
                    return True
                if self._take_over():
                    continue  # the holder was dead: try again at once
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, 0.1)

    def _take_over(self) -> bool:
        """Delete the lock if its holder is dead (compare-and-delete in one transaction); whether it was deleted."""
        with self.cache.transact(retry=False):
            try:
                value = self.cache.get(self.name, retry=False)
            except ValueError:  # not a value this module writes (a planted pickle): nobody holds it
                value, dead = None, "unreadable"
            else:
                dead = _dead_holder(value)
            if dead:
                self.cache.delete(self.name, retry=False)
        if dead:
            logger.warning("hf_neuralcache: semantic index lock of %s taken over (%s)", self.cache.directory, dead)
        return bool(dead)

    def release(self) -> None:
        """Delete the lock if it is still ours (it may have expired and been taken by another process)."""
        if not self.held:
            return
        self.held = False
        with self.cache.transact(retry=True):
            with contextlib.suppress(ValueError):
                if self.cache.get(self.name, retry=True) != self.value:
                    return
            self.cache.delete(self.name, retry=True)


def _process_start(pid: int) -> str | None:
    """Start time of process `pid` (clock ticks since boot, from `/proc`); `"zombie"` when it has exited; `None` when
    unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    if len(fields) < 20:
        return None
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def _whoami() -> dict:
    """This process as a lock holder: host, PID namespace (containers on one host share its name), PID, start."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "ns": namespace, "pid": os.getpid(), "start": _process_start(os.getpid())}


def _dead_holder(value) -> str:
    """Why the holder named by a lock value is known to be dead (empty when it may be alive or is elsewhere)."""
    try:
        holder = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):
        holder = None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return "" if isinstance(value, int) else "not a lock record"  # an int: an older version's PID; it expires
    me, pid = _whoami(), holder["pid"]
    if (holder.get("host"), holder.get("ns")) != (me["host"], me["ns"]) or pid == me["pid"]:
        return ""
    if not 0 < pid < 2**31:  # os.kill(0 or -n) would signal a process group
        return "not a lock record"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its holder, PID {pid}, has exited"
    except OSError:  # PermissionError: alive, another user's
        pass
    start = _process_start(pid)
    if start == "zombie":
        return f"its holder, PID {pid}, has exited"
    if start is not None and holder.get("start") is not None and start != holder.get("start"):
        return f"its holder, PID {pid}, has exited (the PID is another process's now)"
    return ""
class VectorIndex:
    """Label -> unit vector, searched by cosine similarity; `labels` holds the labels added and not removed.

    Args:
        directory (`Path`): Folder of `index.bin` and `index.json`.
        dim (`int`): Length of the vectors.
        embedder (`str`): Fingerprint of the embedder that made them.
        M (`int`), ef_construction (`int`), ef (`int`): hnswlib's graph degree, build breadth and search breadth.
        capacity (`int`, *optional*, defaults to 1024): Initial room; doubled whenever it is full.
        secret (`bytes`, *optional*):
            Key of an HMAC-SHA256 of `index.bin` written to `index.json`; with it, an index without a valid MAC is
            not loaded (rebuilt instead). Without it, only the checksum is checked.

    Example:

    ```python
    >>> import tempfile, diskcache, numpy as np
    >>> from hf_neuralcache.semantic.index import VectorIndex
    >>> folder = tempfile.mkdtemp()
    >>> index = VectorIndex(folder, dim=4, embedder="demo", M=8, ef_construction=32, ef=16, secret=b"key")
    >>> index.add([7, 8], np.eye(4, dtype=np.float32)[:2])
    >>> with diskcache.Cache(f"{folder}/lock") as lock:
    ...     index.save(lock)
    True
    >>> again = VectorIndex(folder, dim=4, embedder="demo", M=8, ef_construction=32, ef=16, secret=b"key")
    >>> again.load(), again.search(np.eye(4, dtype=np.float32)[1], k=1)
    (True, [(8, 1.0)])
    ```
    """

    lock_seconds = 3.0  # the longest a save waits for another process's save (then it is skipped)

    def __init__(self, directory: Path, dim: int, embedder: str, M: int, ef_construction: int, ef: int,  # noqa: N803
                 capacity: int = 1024, secret: bytes | None = None):  # fmt: skip
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise ValueError(f"expected secret to be non-empty bytes or None, got {type(secret).__name__}")
        self.directory, self.dim, self.embedder = Path(directory), dim, embedder
        self.M, self.ef_construction, self.ef, self.capacity = M, ef_construction, ef, max(int(capacity), 1)
        self.secret = secret
        self.reset()

    def reset(self) -> None:
        """Start empty (the files are left alone)."""
        self.index = hnswlib.Index(space="cosine", dim=self.dim)
        self.index.init_index(max_elements=self.capacity, M=self.M, ef_construction=self.ef_construction)
        self.index.set_ef(self.ef)
        self.labels: set[int] = set()

    def _info(self) -> dict:
        return {"embedder": self.embedder, "dim": self.dim, "M": self.M, "ef_construction": self.ef_construction}

    def _mac(self, data: bytes) -> str:
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()

    def _read_info(self) -> dict:
        """`index.json`, checked to be an object with the expected fields and types; `ValueError` if not."""
        text = _read_regular(self.directory / "index.json", lambda head: _MAX_JSON_BYTES)
        info = json.loads(text.decode("utf-8"))
        if not isinstance(info, dict):
            raise ValueError(f"index.json holds a {type(info).__name__}, expected an object")
        built = {name: info.get(name) for name in self._info()}
        if built != self._info() or any(type(built[n]) is not type(v) for n, v in self._info().items()):
            raise ValueError(f"built with {built}, expected {self._info()}")
        if type(info.get("capacity")) is not int or not isinstance(info.get("checksum"), str):
            raise ValueError("index.json lacks an integer capacity or a checksum")
        if self.secret is not None and not isinstance(info.get("mac"), str):
            raise ValueError("index.json has no MAC, and this index is keyed")
        return info

    def _room(self, count: int) -> int:
        """The largest capacity a saved index of `count` elements may claim (it doubles when full)."""
        return max(self.capacity, 2 * count, 4096)

    def _limit(self, head: bytes) -> int:
        """The largest `index.bin` its header allows (`ValueError` when the header itself is off)."""
        fields = _check_header(head, self.dim, self.M, self.ef_construction, self._room(_count(head)))
        return _size_bounds(fields, self.dim, self.M)[1]

    def load(self) -> bool:
        """Replace the contents with the saved index; `False` (and empty) when there is none or it is unusable.

        Unusable: a file that is not a regular file, other build settings, a checksum or MAC that does not match, or
        an `index.bin` that [`check_hnsw_file`] refuses. Why is logged; nothing is raised.
        """
        try:
            info = self._read_info()
            data = _read_regular(self.directory / "index.bin", self._limit)
            if xxhash.xxh3_128_hexdigest(data) != info["checksum"]:
                raise ValueError("checksum mismatch")
            if self.secret is not None and not hmac.compare_digest(self._mac(data), info["mac"]):
                raise ValueError("MAC mismatch: index.bin was not written with this index's secret")
            count = check_hnsw_file(data, self.dim, self.M, self.ef_construction, self._room(_count(data)))
            if info["capacity"] != (room := _HEADER.unpack_from(data)[1]):
                raise ValueError(f"capacity {info['capacity']} in index.json, {room} in index.bin")
            with tempfile.TemporaryDirectory(prefix="hf-neuralcache-index-") as private:  # mode 0700
                path = Path(private) / "index.bin"
                path.write_bytes(data)  # hnswlib reads the checked bytes, not a path another process can swap
                index = hnswlib.Index(space="cosine", dim=self.dim)
                index.load_index(str(path), max_elements=max(info["capacity"], self.capacity, count))
            index.set_ef(self.ef)
        except FileNotFoundError:
            self.reset()
            return False
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError, MemoryError) as err:
            logger.warning("hf_neuralcache: semantic index in %s unusable (%s); rebuilding it", self.directory, err)
            self.reset()
            return False
        self.index, self.labels = index, set(index.get_ids_list())  # may include labels marked deleted
        return True

    def add(self, labels: list[int], vectors: np.ndarray) -> None:
        """Add `vectors` `[N, dim]` under `labels`, growing the index as needed."""
        if not labels:
            return
        needed = self.index.get_current_count() + len(labels)
        if needed > self.index.get_max_elements():
            self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
        self.index.add_items(np.asarray(vectors, dtype=np.float32).reshape(len(labels), self.dim), np.array(labels))
        self.labels.update(labels)

    def remove(self, label: int) -> None:
        """Mark `label` deleted (no-op when it is not in the index)."""
        if label in self.labels:
            self.labels.discard(label)
            try:
                self.index.mark_deleted(label)
            except RuntimeError:  # marked deleted in the saved index already
                pass

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The up to `k` nearest labels and their cosine similarities, most similar first."""
        k = min(k, len(self.labels))
        while k > 0:
            try:
                labels, distances = self.index.knn_query(vector.reshape(1, -1).astype(np.float32), k=k)
                return [(int(a), 1.0 - float(d)) for a, d in zip(labels[0], distances[0], strict=True)]
            except RuntimeError:  # fewer than k reachable (deleted elements cut the graph): ask for fewer
                k //= 2
        return []

    def save(self, lock_cache: diskcache.Cache, wait: bool = True) -> bool:
        """Write `index.bin` and `index.json` atomically, one process at a time; whether they were written.

        Args:
            lock_cache (`diskcache.Cache`): Holds the lock shared by the processes of the folder.
            wait (`bool`, *optional*, defaults to `True`):
                Wait up to `lock_seconds` for another process's save; with `False`, skip the save at once when
                another process is saving. A lock whose holder died on this host is taken over at once either way.

        Returns:
            `bool`: `True` when saved; `False` when skipped (another process is saving) or when the folder could not
            be written (`OSError`, `sqlite3.Error`, `diskcache.Timeout`: logged, never raised).
        """
        lock = _FolderLock(lock_cache)
        written: list[Path] = []
        try:
            if not lock.acquire(self.lock_seconds if wait else 0.0):
                logger.info("hf_neuralcache: another process is saving the semantic index of %s; skipped",
                            self.directory)  # fmt: skip
                return False
            with tempfile.TemporaryDirectory(prefix="hf-neuralcache-index-") as private:
                self.index.save_index(str(Path(private) / "index.bin"))
                data = (Path(private) / "index.bin").read_bytes()
            info = {**self._info(), "checksum": xxhash.xxh3_128_hexdigest(data),
                    "capacity": self.index.get_max_elements()}  # fmt: skip
            if self.secret is not None:
                info["mac"] = self._mac(data)
            for name, content in (("index.bin", data), ("index.json", json.dumps(info).encode())):
                written.append(self._write_new(name, content))
            os.replace(written[0], self.directory / "index.bin")
            os.replace(written[1], self.directory / "index.json")
            return True
        except (OSError, sqlite3.Error, diskcache.Timeout, RuntimeError) as err:
            logger.warning("hf_neuralcache: could not save the semantic index of %s (%s); it is rebuilt on the next "
                           "start", self.directory, err)  # fmt: skip
            return False
        finally:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError, sqlite3.Error, diskcache.Timeout):
                lock.release()

    def _write_new(self, name: str, content: bytes) -> Path:
        """`content` in a new file of the folder (created exclusively: no link followed), synced; its path."""
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.directory)
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        return Path(path)

    def delete_files(self) -> None:
        for name in INDEX_FILES:
            (self.directory / name).unlink(missing_ok=True)


def _count(head: bytes) -> int:
    """The element count an hnswlib header claims (0 when too short to say)."""
    return _HEADER.unpack_from(head)[2] if len(head) >= _HEADER.size else 0
