"""Storage shared by the generate() hooks: a RAM tier in front of a diskcache tier, bytes only, never pickle.

Every entry is one blob:

    b"HFNC" | format version (1 byte) | 3 zero bytes | xxh3-128 checksum of what follows (16 bytes) | safetensors

The safetensors header carries the entry's JSON metadata (its own key among it) under `__metadata__`. A blob is
checked before use: magic, version, checksum, that its safetensors header is consistent and that it names the key
it was read under. A bad entry is a miss; it is deleted and logged.

diskcache serializes anything that is not `bytes`, `str`, `int` or `float` with pickle, and unpickles such rows when
it reads them. [`SafeDisk`] refuses both directions: it stores only those plain types and raises
[`UnsafeEntryError`] instead of unpickling a row someone else wrote, so a pickle planted in a cache directory is
never loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import struct
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cachetools
import diskcache
import safetensors.torch
import torch
import xxhash

logger = logging.getLogger("hf_neuralcache.hooks")

__all__ = [
    "Counters",
    "CorruptEntryError",
    "SafeDisk",
    "TieredStore",
    "UnsafeEntryError",
    "decode_entry",
    "encode_entry",
]

STORAGE_VERSION = 1
MAGIC = b"HFNC"
_HEADER = 24  # keeps the safetensors data 8-byte aligned, as safetensors aligns it within its own bytes
MANIFEST = "hf_neuralcache.json"
EVICTION_POLICIES = ("least-recently-used", "least-frequently-used")


class UnsafeEntryError(ValueError):
    """A row of the cache database holds a pickled key or value, which hf_neuralcache never loads."""


class CorruptEntryError(ValueError):
    """An entry failed its checks (magic, version, checksum, format or key)."""


class SafeDisk(diskcache.Disk):
    """A diskcache `Disk` that stores keys and values as plain SQLite/file data and never unpickles."""

    _PLAIN = (bytes, str, int, float)

    def put(self, key):
        if type(key) not in self._PLAIN:
            raise TypeError(f"hf_neuralcache stores keys as str or bytes, got {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise UnsafeEntryError("refusing to unpickle a cache key")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read or type(value) not in self._PLAIN:
            raise TypeError(f"hf_neuralcache stores values as bytes, str or numbers, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_PICKLE:
            raise UnsafeEntryError("refusing to unpickle a cache value")
        return super().fetch(mode, filename, value, read)


def encode_entry(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """Serialize `tensors` and JSON `meta` into one checked blob for `key`."""
    meta = {**meta, "key": key, "storage_version": STORAGE_VERSION}
    plain, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    body = safetensors.torch.save(
        plain,
        metadata={"hf_neuralcache": json.dumps(meta, sort_keys=True)},
    )
    return MAGIC + bytes([STORAGE_VERSION, 0, 0, 0]) + xxhash.xxh3_128_digest(body) + body


def decode_entry(key: str, blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Check and parse a blob written by [`encode_entry`].

    Raises:
        `CorruptEntryError`: when the blob is not a valid entry for `key`.
    """
    if not isinstance(blob, bytes) or len(blob) < _HEADER + 8 or blob[: len(MAGIC)] != MAGIC:
        raise CorruptEntryError("not an hf_neuralcache entry")
    if blob[len(MAGIC)] != STORAGE_VERSION:
        raise CorruptEntryError(f"storage version {blob[len(MAGIC)]}, expected {STORAGE_VERSION}")
    body = memoryview(blob)[_HEADER:]
    if xxhash.xxh3_128_digest(body) != blob[_HEADER - 16 : _HEADER]:
        raise CorruptEntryError("checksum mismatch")
    try:
        (header_len,) = struct.unpack("<Q", body[:8])
        header = json.loads(bytes(body[8 : 8 + header_len]))
        meta = json.loads(header.pop("__metadata__")["hf_neuralcache"])
        tensors = _views(blob, _HEADER + 8 + header_len, header)
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise CorruptEntryError(f"unreadable entry ({err})") from err
    if meta.get("key") != key:
        raise CorruptEntryError(f"entry names key {meta.get('key')!r}, read under {key!r}")
    return tensors, meta


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _views(blob: bytes, start: int, header: dict) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors body as zero-copy, read-only views of `blob` (the checksum already matched).

    safetensors' own `load` copies the bytes twice; an entry is read to be copied once more into the generation
    cache, so the views save two copies of every loaded byte. The layout (little-endian, C order, `data_offsets`
    relative to the end of the header) is safetensors' documented format.
    """
    tensors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer warns that `bytes` are not writable: never written
        for name, info in header.items():
            dtype = _DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            count = math.prod(shape)
            if not 0 <= begin <= end <= len(blob) - start or end - begin != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r} does not fit the entry")
            flat = torch.frombuffer(blob, dtype=dtype, count=count, offset=start + begin) if count else None
            tensors[name] = flat.view(shape) if flat is not None else torch.empty(shape, dtype=dtype)
    return tensors


def _tensor_bytes(value: tuple[dict[str, torch.Tensor], dict]) -> int:
    return sum(t.numel() * t.element_size() for t in value[0].values()) + 256


@dataclass
class Loaded:
    """An entry read from a [`TieredStore`]: its tensors, its metadata and the tier that served it."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    tier: str  # "ram" or "disk"
    seconds: float
    nbytes: int


class TieredStore:
    """A bounded RAM tier (least-recently-used) in front of a bounded diskcache tier.

    Args:
        directory (`str` or `os.PathLike`): Folder of the disk tier; created if missing.
        kind (`str`): What the folder holds (`"prefix"`, `"inference"`, ...); a folder made for another kind is
            refused.
        disk_bytes (`int`): Bound of the disk tier in bytes (diskcache's `size_limit`, culled after every write).
        ram_bytes (`int`): Bound of the RAM tier in bytes; `0` disables it.
        eviction_policy (`str`): `"least-recently-used"` or `"least-frequently-used"` for the disk tier.
    """

    def __init__(self, directory, kind: str, disk_bytes: int | None, ram_bytes: int, eviction_policy: str | None):
        if eviction_policy is not None and eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction_policy must be one of {list(EVICTION_POLICIES)}, got {eviction_policy!r}")
        for name, value in (("disk_bytes", disk_bytes), ("ram_bytes", ram_bytes)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 (bytes), got {value!r}")
        self.directory = Path(directory).expanduser()
        self.kind = kind
        self._claim(self.directory, kind)
        settings = {"size_limit": disk_bytes, "eviction_policy": eviction_policy}  # None: keep the folder's own
        settings = {name: value for name, value in settings.items() if value is not None}
        # cull_limit=0: we cull to the bound ourselves after each write
        self.disk = self._open("entries", cull_limit=0, statistics=0, **settings)
        self.disk_bytes = self.disk.size_limit
        self.meta = self._open("meta", eviction_policy="none")
        self.ram = cachetools.LRUCache(maxsize=ram_bytes, getsizeof=_tensor_bytes) if ram_bytes else None
        self._lock = threading.Lock()
        self.corrupt = 0

    def _open(self, name: str, **settings) -> diskcache.Cache:
        """Open one diskcache database; an unreadable one is moved aside (and logged) and a new one started."""
        path = self.directory / name
        try:
            cache = diskcache.Cache(str(path), disk=SafeDisk, **settings)
            cache.volume()  # reads the database: a corrupt file fails here, not on the first lookup
            return cache
        except sqlite3.DatabaseError as err:
            aside = path.with_name(f"{name}.unreadable-{int(time.time())}-{os.getpid()}")
            logger.warning("hf_neuralcache: %s is unreadable (%s); moved to %s, starting empty", path, err, aside)
            os.replace(path, aside)
            return diskcache.Cache(str(path), disk=SafeDisk, **settings)

    @classmethod
    def open_existing(cls, directory) -> TieredStore:
        """Open a folder an hf_neuralcache cache made, with its own bounds and policy (for the CLI).

        Raises:
            `ValueError`: when `directory` is not such a folder.
        """
        manifest = Path(directory).expanduser() / MANIFEST
        try:
            kind = json.loads(manifest.read_text())["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{directory} is not an hf_neuralcache cache folder (no valid {MANIFEST})") from None
        return cls(directory, kind, None, 0, None)

    def peek(self, key: str) -> tuple[dict, int, float | None]:
        """`(metadata, bytes, expire_time)` of an entry from its header only (not checked: for listings)."""
        handle, expire = self.disk.get(key, read=True, expire_time=True, retry=True)
        if handle is None:
            raise KeyError(key)
        if isinstance(handle, bytes):
            head, size = handle[: 64 << 10], len(handle)
        else:
            with handle:
                head, size = handle.read(64 << 10), os.fstat(handle.fileno()).st_size
        try:
            (length,) = struct.unpack("<Q", head[_HEADER : _HEADER + 8])
            header = json.loads(head[_HEADER + 8 : _HEADER + 8 + length])
            return json.loads(header["__metadata__"]["hf_neuralcache"]), size, expire
        except (ValueError, KeyError, TypeError, struct.error):
            return {}, size, expire

    def verify(self) -> tuple[int, int]:
        """Remove expired entries and check every other one; returns `(expired, corrupt)` removed."""
        expired = self.disk.expire(retry=True)
        corrupt = self.corrupt
        for key in list(self.keys()):
            self.get(key)  # a bad entry is deleted and counted
        return expired, self.corrupt - corrupt

    @staticmethod
    def _claim(directory: Path, kind: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST
        if not manifest.exists():
            tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"kind": kind, "storage_version": STORAGE_VERSION}))
            os.replace(tmp, manifest)
        try:
            found = json.loads(manifest.read_text())
        except ValueError as err:
            raise ValueError(f"{manifest} is not valid JSON; remove the folder or choose another one") from err
        if found.get("kind") != kind or found.get("storage_version") != STORAGE_VERSION:
            raise ValueError(
                f"{directory} holds a {found.get('kind')!r} cache (storage version {found.get('storage_version')}), "
                f"not a {kind!r} cache (version {STORAGE_VERSION}); use another folder."
            )

    # ---- entries ------------------------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """Whether `key` is stored in either tier (without reading it)."""
        if self.ram is not None and key in self.ram:
            return True
        try:
            return key in self.disk
        except UnsafeEntryError:
            return False

    def where(self, key: str) -> str | None:
        """`"ram"`, `"disk"` or `None`: the fastest tier holding `key`."""
        if self.ram is not None and key in self.ram:
            return "ram"
        return "disk" if self.contains(key) else None

    def get(self, key: str) -> Loaded | None:
        """The entry under `key`, checked, or `None` (a bad entry is deleted, logged and counted as corrupt)."""
        start = time.perf_counter()
        if self.ram is not None:
            with self._lock:
                value = self.ram.get(key)
            if value is not None:
                return Loaded(value[0], value[1], "ram", time.perf_counter() - start, _tensor_bytes(value))
        try:
            blob = self.disk.get(key, default=None, retry=True)
            if blob is None:
                return None
            tensors, meta = decode_entry(key, blob)
        except (CorruptEntryError, UnsafeEntryError, OSError) as err:
            self.corrupt += 1
            logger.warning("hf_neuralcache: dropping bad %s cache entry %s: %s", self.kind, key[:16], err)
            self.delete(key)
            return None
        loaded = Loaded(tensors, meta, "disk", time.perf_counter() - start, len(blob))
        self._remember(key, tensors, meta)
        return loaded

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], expire: float | None = None):
        """Store an entry in both tiers. Returns the bytes written to disk (0 when it exceeds the disk bound)."""
        if expire is not None:
            meta = {**meta, "expires_at": time.time() + expire}
        blob = encode_entry(key, tensors, meta)
        if len(blob) > self.disk_bytes:
            logger.info(
                "hf_neuralcache: %s entry of %d bytes exceeds disk_bytes=%d", self.kind, len(blob), self.disk_bytes
            )
            return 0
        self.disk.set(key, blob, expire=expire, retry=True)
        self.disk.cull(retry=True)
        self._remember(key, {n: t.detach().cpu() for n, t in tensors.items()}, meta)
        return len(blob)

    def _remember(self, key, tensors, meta) -> None:
        if self.ram is None or meta.get("expires_at") is not None:
            return
        if torch.cuda.is_available():  # page-locked host memory copies to the GPU about 3x faster (DMA)
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        value = (tensors, meta)
        if _tensor_bytes(value) <= self.ram.maxsize:
            with self._lock:
                self.ram[key] = value

    def delete(self, key: str) -> None:
        if self.ram is not None:
            with self._lock:
                self.ram.pop(key, None)
        try:
            self.disk.delete(key, retry=True)
        except UnsafeEntryError:  # pragma: no cover - delete does not read the value
            pass

    def forget_ram(self) -> None:
        """Empty the RAM tier (the disk tier is kept)."""
        if self.ram is not None:
            with self._lock:
                self.ram.clear()

    def clear(self) -> int:
        """Remove every entry from both tiers; returns how many disk entries were removed."""
        self.forget_ram()
        return self.disk.clear(retry=True)

    def volume(self) -> int:
        """Bytes the disk tier occupies (diskcache's estimate: database pages + value files)."""
        return self.disk.volume()

    def __len__(self) -> int:
        return len(self.disk)

    def keys(self):
        """The keys on disk, skipping any row with a pickled key."""
        iterator = iter(self.disk)
        while True:
            try:
                yield next(iterator)
            except StopIteration:
                return
            except UnsafeEntryError:
                continue

    def close(self) -> None:
        self.disk.close()
        self.meta.close()

    # ---- small JSON records (statistics, measurements) ------------------------------------------------------------
    def read_record(self, name: str) -> dict:
        try:
            text = self.meta.get(name, default=None, retry=True)
            return json.loads(text) if isinstance(text, str) else {}
        except (UnsafeEntryError, ValueError):
            return {}

    def update_record(self, name: str, update) -> dict:
        """Apply `update(record) -> record` to the JSON record `name` atomically across processes."""
        with self.meta.transact(retry=True):
            record = update(self.read_record(name))
            self.meta.set(name, json.dumps(record, sort_keys=True), retry=True)
        return record


class Counters:
    """Statistics of one cache object, also added to the folder's persistent totals (for `hf-neuralcache cache stats`).

    Increments stay in memory and are flushed to the folder at most once a second, on `flush()` and when the object
    is garbage-collected or the process exits normally, so counting costs no disk write on the hot path.
    """

    def __init__(self, store: TieredStore, names: tuple[str, ...]):
        self.store = store
        self.values: dict[str, float] = dict.fromkeys(names, 0)
        self._unflushed: dict[str, float] = {}
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, Counters._flush_totals, store, self._unflushed, self._lock)

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0) + amount
            self._unflushed[name] = self._unflushed.get(name, 0) + amount
        if time.monotonic() - self._last_flush > 1.0:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        Counters._flush_totals(self.store, self._unflushed, self._lock)

    @staticmethod
    def _flush_totals(store: TieredStore, unflushed: dict, lock: threading.Lock) -> None:
        with lock:
            pending = dict(unflushed)
            unflushed.clear()
        if not pending:
            return

        def add(record):
            for name, amount in pending.items():
                record[name] = record.get(name, 0) + amount
            return record

        try:
            store.update_record("stats", add)
        except (OSError, diskcache.Timeout) as err:  # statistics must never break generation
            logger.warning("hf_neuralcache: could not save statistics: %s", err)


class StoreBackedCache:
    """What the hooks' caches share: a [`TieredStore`] and its [`Counters`], and the operations on both."""

    store: TieredStore
    counters: Counters

    def stats(self) -> dict:
        """This object's counters (listed in the class docstring) plus the folder's `entries`, `bytes` on disk and
        `corrupt` (bad entries dropped)."""
        return {
            **self.counters.values,
            "entries": len(self.store),
            "bytes": self.store.volume(),
            "corrupt": self.store.corrupt,
        }

    def clear(self) -> None:
        """Remove every entry (all namespaces and models) from both tiers."""
        self.store.clear()

    def close(self) -> None:
        """Save the statistics and close the folder's database connections."""
        self.counters.flush()
        self.store.close()
