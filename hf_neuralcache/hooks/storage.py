"""Storage shared by the generate() hooks: a RAM tier in front of a disk tier, bytes only, never pickle.

Every entry is one blob:

    b"HFNC" | format version (1 byte) | flags (1 byte) | 2 zero bytes | xxh3-128 checksum of what follows (16 bytes)
    | HMAC-SHA256 of the key and the safetensors bytes (32 bytes, only when flag 1 is set) | safetensors

The safetensors header carries the entry's JSON metadata (its own key among it) under `__metadata__`. A blob is
checked before use: magic, version, checksum, the MAC when the store has a secret, that its safetensors header is
consistent and that it names the key it was read under. A bad entry is a miss; it is deleted, logged and counted.

**A cache never fails a request.** Every operation on the folder goes through one guard ([`TieredStore`]): a
storage failure (a full disk, a folder whose permissions changed, a database locked too long) is a miss or a skipped
write, an integrity failure (a damaged or forged entry, a corrupt database page) is a miss and the entry is
dropped; each is counted (`storage_errors`, `integrity_errors`, `skipped` in `stats()`) and logged once per kind. A
folder this process cannot write is used read-only (its hits are still served); see `disk.py` for what a hostile
folder can and cannot do.
"""

from __future__ import annotations

import concurrent.futures
import hmac
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
from collections import Counter
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import cachetools
import diskcache
import safetensors.torch
import torch
import xxhash

from .disk import CorruptEntryError, SafeDisk, UnsafeEntryError, is_corruption, open_database, read_regular_file
from .remote import RedisTier

logger = logging.getLogger("hf_neuralcache.hooks")

__all__ = [
    "Counters",
    "CorruptEntryError",
    "SafeDisk",
    "TieredStore",
    "UnsafeEntryError",
    "decode_entry",
    "encode_entry",
    "parse_json_object",
]

STORAGE_VERSION = 1
MAGIC = b"HFNC"
_HEADER = 24  # keeps the safetensors data 8-byte aligned, as safetensors aligns it within its own bytes
_MAC_FLAG, _MAC_BYTES = 1, 32
MANIFEST = "hf_neuralcache.json"
EVICTION_POLICIES = ("least-recently-used", "least-frequently-used")
CACHE_KINDS = ("prefix", "inference", "semantic")
RECORD_LIMIT = 1 << 20  # bytes of one JSON record (statistics, measurements, labels) or a manifest
ERROR_KINDS = ("storage_errors", "integrity_errors", "skipped")
_BYPASS = "bypassed:"  # counter names of the bypass reasons
_STORAGE_FAILURES = (OSError, diskcache.Timeout)
_FILL_DELAY = 1.0  # remote hits are copied to the disk tier together, at most this many seconds after the first
_FILL_QUEUE_BYTES = 1 << 30  # remote hits waiting to be copied to the disk tier beyond this are not copied


def parse_json_object(data, limit: int = RECORD_LIMIT) -> dict:
    """The JSON object in `data` (`bytes` or `str`, at most `limit` bytes).

    Raises:
        `CorruptEntryError`: when `data` is too large, not UTF-8, not JSON, nested too deeply, or not an object.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptEntryError(f"expected a JSON record, got {type(data).__name__}")
    if len(data) > limit:
        raise CorruptEntryError(f"JSON record of {len(data)} bytes exceeds {limit}")
    try:
        value = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise CorruptEntryError(f"not a JSON record ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise CorruptEntryError(f"JSON record is a {type(value).__name__}, not an object")
    return value


def _mac(secret: bytes, key: str, body) -> bytes:
    return hmac.new(secret, key.encode() + b"\0" + bytes(body), sha256).digest()


def encode_entry(
    key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], secret: bytes | None = None
) -> bytes:
    """Serialize `tensors` and JSON `meta` into one checked blob for `key` (MACed with `secret` when given)."""
    meta = {**meta, "key": key, "storage_version": STORAGE_VERSION}
    plain, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    body = safetensors.torch.save(plain, metadata={"hf_neuralcache": json.dumps(meta, sort_keys=True)})
    mac = _mac(secret, key, body) if secret else b""
    flags = _MAC_FLAG if secret else 0
    return MAGIC + bytes([STORAGE_VERSION, flags, 0, 0]) + xxhash.xxh3_128_digest(mac + body) + mac + body


def decode_entry(key: str, blob: bytes, secret: bytes | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Check and parse a blob written by [`encode_entry`].

    With `secret`, an entry without a valid MAC for `key` is refused (a forged entry with a correct checksum).

    Raises:
        `CorruptEntryError`: when the blob is not a valid entry for `key`.
    """
    if not isinstance(blob, bytes) or len(blob) < _HEADER + 8 or blob[: len(MAGIC)] != MAGIC:
        raise CorruptEntryError("not an hf_neuralcache entry")
    if blob[len(MAGIC)] != STORAGE_VERSION:
        raise CorruptEntryError(f"storage version {blob[len(MAGIC)]}, expected {STORAGE_VERSION}")
    flags = blob[len(MAGIC) + 1]
    if flags not in (0, _MAC_FLAG) or blob[len(MAGIC) + 2 : _HEADER - 16] != b"\0\0":
        raise CorruptEntryError(f"unknown entry flags {flags}")
    start = _HEADER + (_MAC_BYTES if flags else 0)
    if xxhash.xxh3_128_digest(memoryview(blob)[_HEADER:]) != blob[_HEADER - 16 : _HEADER]:
        raise CorruptEntryError("checksum mismatch")
    body = memoryview(blob)[start:]
    if secret and not (flags and hmac.compare_digest(blob[_HEADER:start], _mac(secret, key, body))):
        raise CorruptEntryError("no valid MAC for this cache's secret")
    try:
        (header_len,) = struct.unpack("<Q", body[:8])
        if header_len > len(body) - 8:
            raise ValueError("header longer than the entry")
        header = parse_json_object(body[8 : 8 + header_len], limit=len(body))
        meta = parse_json_object(header.pop("__metadata__")["hf_neuralcache"])
        tensors = _views(blob, start + 8 + header_len, header)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, struct.error) as err:
        raise CorruptEntryError(f"unreadable entry ({err})") from err
    if meta.get("key") != key:
        raise CorruptEntryError(f"entry names key {str(meta.get('key'))[:40]!r}, read under {key!r}")
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
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            count = math.prod(shape)
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(blob) - start:
                raise ValueError(f"tensor {name!r} does not fit the entry")
            if end - begin != count * dtype.itemsize:
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
    tier: str  # "ram", "disk" or "redis"
    seconds: float
    nbytes: int


def _secret_bytes(secret) -> bytes | None:
    if secret is None:
        from ..env import cache_secret

        secret = cache_secret()
    if secret is None or secret == b"" or secret == "":
        return None
    if isinstance(secret, str):
        return secret.encode()
    if isinstance(secret, bytes):
        return secret
    raise ValueError(f"secret must be a str or bytes, got {type(secret).__name__}")


class TieredStore:
    """A bounded RAM tier (least-recently-used) in front of a bounded disk tier (diskcache), failures as misses.

    Args:
        directory (`str` or `os.PathLike`): Folder of the disk tier; created if missing.
        kind (`str`): What the folder holds (`"prefix"`, `"inference"`, ...); a folder made for another kind is
            refused.
        disk_bytes (`int`): Bound of the disk tier in bytes (entries evicted in policy order after every write).
        ram_bytes (`int`): Bound of the RAM tier in bytes; `0` disables it.
        eviction_policy (`str`): `"least-recently-used"` or `"least-frequently-used"` for the disk tier.
        secret (`str` or `bytes`, *optional*): MAC key of the entries; defaults to `HF_NEURALCACHE_SECRET`.
        remote ([`RedisTier`], *optional*): A shared tier behind the disk tier (see `remote.py`): looked up after
            a local miss (a hit fills the local tiers), written after the local tiers without waiting.
        remote_dtype (`torch.dtype`, *optional*): Floating-point tensors are stored in the remote tier in this dtype
            (e.g. `torch.bfloat16`: half the bytes to move; what another host reads, and copies to its own tiers,
            is then this precision). `None`: as given.

    Raises:
        `ValueError`: for bad arguments, a path that is a file or cannot be created, or a folder of another kind.

    Nothing else raises: a folder that cannot be written is used read-only, one that cannot be read at all is a store
    whose every lookup misses (both logged and shown by `readonly` / `disabled`).
    """

    def __init__(
        self,
        directory,
        kind: str,
        disk_bytes: int | None,
        ram_bytes: int,
        eviction_policy: str | None,
        secret: str | bytes | None = None,
        remote: RedisTier | None = None,
        remote_dtype: torch.dtype | None = None,
    ):
        if eviction_policy is not None and eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction_policy must be one of {list(EVICTION_POLICIES)}, got {eviction_policy!r}")
        for name, value in (("disk_bytes", disk_bytes), ("ram_bytes", ram_bytes)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 (bytes), got {value!r}")
        self.directory = Path(directory).expanduser()
        self.kind = kind
        self.secret = _secret_bytes(secret)
        self.errors: Counter = Counter()
        self.counters: Counters | None = None
        self._logged: set = set()
        self._lock = threading.Lock()
        self._scope = threading.local()
        self._filler: concurrent.futures.ThreadPoolExecutor | None = None
        self._filling = 0  # bytes of remote hits waiting to be copied to the disk tier
        self._fills: list = []  # (key, blob, expiry time) of those hits
        self._fill_scheduled = False
        self._fill_now = threading.Event()
        self.remote, self.remote_dtype = remote, remote_dtype
        if remote is not None:
            remote.on_failure = self.failed
        self.ram = cachetools.LRUCache(maxsize=ram_bytes, getsizeof=_tensor_bytes) if ram_bytes else None
        self.disk = self.meta = None
        self.readonly: str | None = None  # why the folder is used read-only
        writable = self._claim(self.directory, kind)
        settings = {"size_limit": disk_bytes, "eviction_policy": eviction_policy}  # None: keep the folder's own
        settings = {name: value for name, value in settings.items() if value is not None}
        # cull_limit=0: we evict to the bound ourselves after each write
        limit = disk_bytes if disk_bytes is not None else 1 << 40
        self.disk, why = open_database(self.directory / "entries", limit, cull_limit=0, statistics=0, **settings)
        self.meta, why_meta = open_database(self.directory / "meta", RECORD_LIMIT, eviction_policy="none")
        self.disk_bytes = getattr(self.disk, "size_limit", disk_bytes) if self.disk is not None else (disk_bytes or 0)
        self.disk_bytes = int(self.disk_bytes)
        reasons = [r for r in (why, why_meta, writable) if r]
        if self.disk is None or self.meta is None:
            self.readonly = "; ".join(reasons) or "unusable"
            self.failed("storage", "open", OSError(f"{self.directory} cannot be used, every lookup misses: "
                                                    f"{self.readonly}"))  # fmt: skip
        elif reasons or getattr(self.disk, "readonly", False) or getattr(self.meta, "readonly", False):
            self.readonly = "; ".join(reasons)
            logger.warning("hf_neuralcache: %s cache at %s is read-only (%s): hits are served, nothing is written",
                           kind, self.directory, self.readonly)  # fmt: skip

    @property
    def disabled(self) -> bool:
        """Whether the folder could not be opened at all (every lookup misses)."""
        return self.disk is None or self.meta is None

    # ---- failures -----------------------------------------------------------------------------------------------
    def failed(self, kind: str, op: str, err: BaseException, logged: bool = False) -> None:
        """Count a failure (`kind` is "storage", "integrity" or "skipped") and log it once per kind, op and error
        (`logged`: the caller has logged it already, e.g. the remote tier, once per outage)."""
        name = kind if kind == "skipped" else f"{kind}_errors"
        self.errors[name] += 1
        if self.counters is not None:
            self.counters.add(name, 1)
        mark = (kind, op, type(err).__name__)
        if mark not in self._logged and not logged:
            self._logged.add(mark)
            logger.warning("hf_neuralcache: %s cache %s: %s failed (%s: %s); the request goes on without it "
                           "(logged once, counted as %s in stats())", self.kind, self.directory, op,
                           type(err).__name__, err, name)  # fmt: skip

    def guarded(self, op: str, fn, *args, default=None, **kwargs):
        """`fn(*args, **kwargs)`, or `default` when the storage fails (counted and logged, see the module docstring)."""
        try:
            return fn(*args, **kwargs)
        except (CorruptEntryError, UnsafeEntryError) as err:
            self.failed("integrity", op, err)
        except sqlite3.DatabaseError as err:
            self.failed("integrity" if is_corruption(err) else "storage", op, err)
        except _STORAGE_FAILURES as err:
            self.failed("storage", op, err)
        return default

    def writable(self, op: str) -> bool:
        """Whether a write may go to the folder; a write refused because it is read-only is counted as skipped."""
        if self.readonly is None:
            return True
        self.failed("skipped", op, PermissionError(f"read-only: {self.readonly}"))
        return False

    # ---- the folder ---------------------------------------------------------------------------------------------
    @classmethod
    def open_existing(cls, directory) -> TieredStore:
        """Open a folder an hf_neuralcache cache made, with its own bounds and policy (for the CLI).

        Raises:
            `ValueError`: when `directory` does not exist or is not such a folder.
        """
        path = Path(directory).expanduser()
        if not path.exists():
            raise ValueError(f"{directory} does not exist")
        try:
            kind = parse_json_object(read_regular_file(path / MANIFEST, RECORD_LIMIT))["kind"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(
                f"{directory} is not an hf_neuralcache cache folder (no valid {MANIFEST}: {err})"
            ) from None
        if not isinstance(kind, str):
            raise ValueError(f"{directory} is not an hf_neuralcache cache folder (bad kind in {MANIFEST})")
        return cls(directory, kind, None, 0, None)

    @staticmethod
    def _claim(directory: Path, kind: str) -> str | None:
        """Make sure `directory` is a folder of `kind` (creating it and its manifest if need be).

        Returns `None`, or why the folder cannot be written (it is then used read-only).
        """
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"cache folder {directory} exists and is not a folder; choose another path")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if not directory.is_dir():
                raise ValueError(f"cannot create the cache folder {directory} ({err.strerror or err}); "
                                 "choose a folder this process can write") from None  # fmt: skip
        manifest = directory / MANIFEST
        why = None
        try:
            found = parse_json_object(read_regular_file(manifest, RECORD_LIMIT))
            if found.get("kind") not in CACHE_KINDS:
                raise CorruptEntryError(f"unknown kind {str(found.get('kind'))[:40]!r}")
        except (FileNotFoundError, CorruptEntryError) as err:
            if not isinstance(err, FileNotFoundError):  # damaged: the databases beside it say what the folder is
                logger.warning("hf_neuralcache: %s is damaged (%s); writing it again", manifest, err)
            found = {"kind": kind, "storage_version": STORAGE_VERSION}
            tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
            try:
                tmp.write_text(json.dumps(found))
                os.replace(tmp, manifest)  # replaces a link or a FIFO itself, never what it points to
            except OSError as write_err:
                why = f"cannot write {manifest} ({write_err.strerror or write_err})"
        except OSError as err:
            why = f"cannot read {manifest} ({err.strerror or err})"
            found = {"kind": kind, "storage_version": STORAGE_VERSION}
        if found["kind"] != kind:
            raise ValueError(f"{directory} holds a {found['kind']!r} cache, not a {kind!r} cache; use another folder.")
        if found.get("storage_version") != STORAGE_VERSION:  # each entry carries its version: they will be misses
            why = f"its manifest names storage version {str(found.get('storage_version'))[:20]}, not {STORAGE_VERSION}"
        return why

    def peek(self, key: str) -> tuple[dict, int, float | None] | None:
        """`(metadata, bytes, expire_time)` of an entry from its header only (not checked: for listings), or `None`
        when the row cannot be read."""

        def read():
            blob, expire = self.disk.get(key, read=False, expire_time=True, retry=True)
            if blob is None:
                return None
            head = blob if isinstance(blob, bytes) else b""
            start = _HEADER + (_MAC_BYTES if len(head) > 5 and head[5] else 0)
            try:
                (length,) = struct.unpack("<Q", head[start : start + 8])
                header = parse_json_object(head[start + 8 : start + 8 + length], limit=len(head))
                return parse_json_object(header["__metadata__"]["hf_neuralcache"]), len(head), expire
            except (ValueError, KeyError, TypeError, struct.error):
                return {}, len(head), expire

        return None if self.disabled else self.guarded("peek", read)

    def verify(self) -> tuple[int, int]:
        """Remove expired entries and check every other one; returns `(expired, bad)` removed."""
        if self.disabled or not self.writable("verify"):
            return 0, 0
        expired = self.guarded("expire", self.disk.expire, retry=True, default=0)
        bad = self.errors["integrity_errors"]
        for key in list(self.keys()):
            self.get(key)  # a bad entry is deleted and counted
        return expired, self.errors["integrity_errors"] - bad

    # ---- entries ------------------------------------------------------------------------------------------------
    def use_model(self, fingerprint: str) -> None:
        """Name the model of this thread's current request (part of the remote tier's keys; see `remote.py`)."""
        self._scope.model = fingerprint

    @property
    def model(self) -> str:
        """The model fingerprint named by this thread's last [`use_model`] (`""` when none was)."""
        return getattr(self._scope, "model", "")

    def remote_key(self, key: str, model: str | None = None) -> str | None:
        """The remote tier's key of `key` for `model` (default: this thread's current model), or `None` without a
        remote tier."""
        return None if self.remote is None else self.remote.key(key, self.model if model is None else model)

    def local(self, key: str) -> bool:
        """Whether `key` is stored in the RAM or disk tier (never asks the remote tier)."""
        if self.ram is not None and key in self.ram:
            return True
        return False if self.disabled else self.guarded("lookup", self.disk.__contains__, key, default=False)

    def contains(self, key: str) -> bool:
        """Whether `key` is stored in any tier (without reading it)."""
        return self.local(key) or (self.remote is not None and self.remote.exists(self.remote_key(key)))

    def where(self, key: str) -> str | None:
        """`"ram"`, `"disk"`, `"redis"` or `None`: the fastest tier holding `key`."""
        if self.ram is not None and key in self.ram:
            return "ram"
        if self.local(key):
            return "disk"
        return "redis" if self.remote is not None and self.remote.exists(self.remote_key(key)) else None

    def get(self, key: str, model: str | None = None, defer_fill: bool = False) -> Loaded | None:
        """The entry under `key`, checked, or `None` (a bad entry is deleted, logged and counted). `model` names the
        model of the remote tier's key (default: this thread's current model, see [`use_model`]).

        A remote hit is copied into the local tiers in the background, or with `defer_fill` only when this thread
        calls [`fill_deferred`] (after the request, so that the copy does not compete with it)."""
        start = time.perf_counter()
        if self.ram is not None:
            with self._lock:
                value = self.ram.get(key)
            if value is not None:
                return Loaded(value[0], value[1], "ram", time.perf_counter() - start, _tensor_bytes(value))
        blob = None if self.disabled else self.guarded("read", self.disk.get, key, default=None, retry=True)
        tier = "disk"
        if blob is None and self.remote is not None:
            blob, tier = self.remote.get(self.remote_key(key, model)), "redis"
        return None if blob is None else self._accept(key, blob, tier, start, model, defer=defer_fill)

    def fill_deferred(self) -> None:
        """Start copying the remote hits this thread read with `defer_fill` into the local tiers."""
        deferred, self._scope.deferred = getattr(self._scope, "deferred", []), []
        for key, blob, expires_at in deferred:
            self._fill_later(key, blob, expires_at)

    def get_remote(self, wanted: list[tuple[str, str]]) -> list[Loaded | None]:
        """The entries `[(key, model)]` read from the remote tier in one round trip, checked and copied into the
        local tiers (at once, not in the background as [`get`] does); `None` for each one missing, expired or bad."""
        if self.remote is None or not wanted:
            return [None] * len(wanted)
        start = time.perf_counter()
        blobs = self.remote.get_many([self.remote_key(key, model) for key, model in wanted])
        return [None if blob is None else self._accept(key, blob, "redis", start, model, wait=True)
                for (key, model), blob in zip(wanted, blobs, strict=True)]  # fmt: skip

    def _accept(
        self, key: str, blob: bytes, tier: str, start: float, model: str | None, wait: bool = False, defer=False
    ) -> Loaded | None:
        """Check a blob read from `tier`; a good one from the remote tier is copied into the local tiers."""
        try:
            tensors, meta = decode_entry(key, blob, self.secret)
        except CorruptEntryError as err:
            self.failed("integrity", "check" if tier == "disk" else "redis check", err)
            logger.info("hf_neuralcache: dropping bad %s cache entry %s from %s: %s", self.kind, key[:16], tier, err)
            if tier == "disk":
                self.delete(key)
            else:
                self.remote.delete(self.remote_key(key, model))
            return None
        if tier == "redis":
            expires_at = None if meta.get("expires_at") is None else float(meta["expires_at"])
            if expires_at is not None and expires_at <= time.time():
                return None  # expired by this machine's clock
            if wait:
                self._write_local(key, blob, None if expires_at is None else expires_at - time.time())
            elif defer:
                self._scope.__dict__.setdefault("deferred", []).append((key, blob, expires_at))
            else:
                self._fill_later(key, blob, expires_at)
        loaded = Loaded(tensors, meta, tier, time.perf_counter() - start, len(blob))
        self._remember(key, tensors, meta)
        return loaded

    def _fill_later(self, key: str, blob: bytes, expires_at: float | None) -> None:
        """Copy a remote hit into the disk tier in the background: hits are collected and written together, at most
        `_FILL_DELAY` seconds later, in one transaction (a thread writing after every hit would compete with the
        requests for the interpreter and double their time)."""
        if self.disabled or self.readonly is not None:
            return
        with self._lock:
            if self._filling + len(blob) > _FILL_QUEUE_BYTES:
                return  # the next hit on this key reads Redis again
            self._filling += len(blob)
            self._fills.append((key, blob, expires_at))
            if self._fill_scheduled:
                return
            if self._filler is None:
                self._filler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf_neuralcache-fill")
            self._fill_scheduled = True
            filler = self._filler
        try:
            filler.submit(self._drain_fills)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._fills, self._filling, self._fill_scheduled = [], 0, False

    def _drain_fills(self) -> None:
        self._fill_now.wait(_FILL_DELAY)
        with self._lock:
            fills, self._fills, self._fill_scheduled = self._fills, [], False
            self._fill_now.clear()

        def write():
            with self.disk.transact(retry=True):
                for key, blob, expires_at in fills:
                    left = None if expires_at is None else expires_at - time.time()
                    if (left is None or left > 0) and len(blob) <= self.disk_bytes:
                        self.disk.set(key, blob, expire=left, retry=True)
            self.evict(self.disk_bytes, keep=fills[-1][0])

        try:
            if fills and not self.disabled and self.readonly is None:
                self.guarded("write", write)
        finally:
            with self._lock:
                self._filling -= sum(len(blob) for _, blob, _ in fills)

    def settle(self, timeout: float = 10.0) -> None:
        """Write the remote hits waiting to be copied into the disk tier now, and wait (at most `timeout` seconds)."""
        filler = self._filler
        if filler is not None:
            self._fill_now.set()
            try:
                concurrent.futures.wait([filler.submit(lambda: None)], timeout=timeout)
            except RuntimeError:  # closed meanwhile
                pass

    def _write_local(self, key: str, blob: bytes, expire: float | None) -> int:
        if self.disabled or self.readonly is not None or len(blob) > self.disk_bytes:
            return 0

        def write():
            self.disk.set(key, blob, expire=expire, retry=True)
            self.evict(self.disk_bytes, keep=key)
            return len(blob)

        return self.guarded("write", write, default=0)

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], expire: float | None = None):
        """Store an entry in every tier (the remote one in the background). Returns the bytes written locally, or
        handed to the remote tier when the folder could not take them (0 when it was written nowhere)."""
        remote = self.remote is not None and self.remote.available
        if (self.disabled or not self.writable("write")) and not remote:
            return 0
        if expire is not None:
            meta = {**meta, "expires_at": time.time() + expire}
        blob = encode_entry(key, tensors, meta, self.secret)
        written = 0
        if len(blob) > self.disk_bytes:
            logger.info(
                "hf_neuralcache: %s entry of %d bytes exceeds disk_bytes=%d", self.kind, len(blob), self.disk_bytes
            )
        elif not self.disabled and self.readonly is None:
            written = self._write_local(key, blob, expire)
        if written:
            self._remember(key, {n: t.detach().cpu() for n, t in tensors.items()}, meta)
        if self.remote is not None:
            remote_blob, size = blob, len(blob)
            if self.remote_dtype is not None and any(t.is_floating_point() for t in tensors.values()):
                dtype, owned = self.remote_dtype, dict(tensors)  # the callers hand over tensors they do not change
                size = sum(t.numel() * dtype.itemsize for t in owned.values())

                def remote_blob():  # cast and encoded by the writer thread, off the request's path
                    cast = {n: t.detach().to(dtype) if t.is_floating_point() else t for n, t in owned.items()}
                    return encode_entry(key, cast, meta, self.secret)

            if self.remote.put(self.remote_key(key), remote_blob, ttl=expire, size=size):
                written = written or len(blob)
        return written

    def used_bytes(self) -> int:
        """Bytes the disk tier's entries take: database pages in use (free pages excluded) + value files."""
        disk = self.disk
        if self.disabled:
            return 0
        if getattr(disk, "readonly", False):
            return disk.volume()
        ((pages,),) = disk._sql("PRAGMA page_count").fetchall()
        ((free,),) = disk._sql("PRAGMA freelist_count").fetchall()
        return (pages - free) * disk._page_size + disk.reset("size")

    def evict(self, limit: int, keep: str | None = None) -> int:
        """Remove expired entries, then entries in eviction-policy order until the disk tier holds at most `limit`
        bytes, never `keep` (the entry just written). Returns how many entries were removed."""
        removed = self.disk.expire(retry=True)
        query = diskcache.core.EVICTION_POLICY[self.disk.eviction_policy]["cull"]
        if query is None:
            return removed
        select = query.format(fields="rowid, key, raw, filename", now=time.time())
        while self.used_bytes() > limit:
            victims = [row for row in self.disk._sql(select, (8,)).fetchall() if row[1] != keep]
            if not victims:
                break
            for rowid, key, raw, filename in victims:
                with self.disk.transact(retry=True):
                    self.disk._sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
                if filename:
                    self.disk.disk.remove(filename)
                if self.ram is not None and raw:
                    with self._lock:
                        self.ram.pop(key, None)
                removed += 1
                if self.used_bytes() <= limit:
                    break
        return removed

    def _remember(self, key, tensors, meta) -> None:
        if self.ram is None or meta.get("expires_at") is not None:
            return
        if torch.cuda.is_available():  # page-locked host memory copies to the GPU about 3x faster (DMA)
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        value = (tensors, meta)
        if _tensor_bytes(value) <= self.ram.maxsize:
            with self._lock:
                self.ram[key] = value

    def delete(self, key: str, model: str | None = None, shared: bool = True) -> None:
        """Remove `key` from every tier (`shared=False`: from the local tiers only; `model` as in [`get`])."""
        if self.ram is not None:
            with self._lock:
                self.ram.pop(key, None)
        if not self.disabled and self.readonly is None:
            self.guarded("delete", self.disk.delete, key, retry=True)
        if self.remote is not None and shared:
            self.remote.delete(self.remote_key(key, model))

    def forget_ram(self) -> None:
        """Empty the RAM tier (the disk tier is kept)."""
        if self.ram is not None:
            with self._lock:
                self.ram.clear()

    def clear(self) -> int:
        """Remove every entry from every tier (from the remote one: this kind and namespace, every model); returns
        how many disk entries were removed."""
        self.forget_ram()
        if self.remote is not None:
            self.remote.clear()
        if self.disabled or not self.writable("clear"):
            return 0
        return self.guarded("clear", self.disk.clear, retry=True, default=0)

    def volume(self) -> int:
        """Bytes the disk tier's entries occupy (see [`used_bytes`])."""
        return self.guarded("size", self.used_bytes, default=0)

    def __len__(self) -> int:
        return 0 if self.disabled else self.guarded("count", len, self.disk, default=0)

    def keys(self):
        """The keys on disk, skipping any row that cannot be read (a pickled or damaged key)."""
        if self.disabled:
            return
        iterator = self.guarded("list", iter, self.disk)
        while iterator is not None:
            try:
                yield next(iterator)
            except StopIteration:
                return
            except (UnsafeEntryError, CorruptEntryError, UnicodeDecodeError):
                continue
            except (sqlite3.Error, *_STORAGE_FAILURES) as err:
                self.failed("storage", "list", err)
                return

    def close(self) -> None:
        if self._filler is not None:
            self._fill_now.set()
            self._filler.shutdown(wait=True)
            self._filler = None
        if self.remote is not None:
            self.remote.close()
        for database in (self.disk, self.meta):
            if database is not None:
                self.guarded("close", database.close)

    # ---- small JSON records (statistics, measurements, labels) ---------------------------------------------------
    def read_record(self, name: str) -> dict:
        """The JSON record `name`, or `{}` when there is none or it is unreadable (counted as an integrity error)."""
        if self.disabled:
            return {}
        data = self.guarded("read record", self.meta.get, name, default=None, retry=True)
        if data is None:
            return {}
        try:
            return parse_json_object(data)
        except CorruptEntryError as err:
            self.failed("integrity", "read record", err)
            return {}

    def record_names(self) -> list[str]:
        """The names of the JSON records (rows that cannot be read are skipped)."""
        if self.disabled:
            return []
        names, iterator = [], self.guarded("list records", iter, self.meta)
        while iterator is not None:
            try:
                name = next(iterator)
            except StopIteration:
                break
            except (UnsafeEntryError, CorruptEntryError, UnicodeDecodeError):
                continue
            except (sqlite3.Error, *_STORAGE_FAILURES) as err:
                self.failed("storage", "list records", err)
                break
            if isinstance(name, str):
                names.append(name)
        return names

    def update_record(self, name: str, update, also: dict[str, dict | None] | None = None) -> dict | None:
        """Apply `update(record) -> record` to the JSON record `name` atomically across processes, and in the same
        transaction write (or, for `None`, delete) the records of `also`. Returns the new record, or `None` when it
        could not be written."""
        if self.disabled or not self.writable("write record"):
            return None

        def apply():
            with self.meta.transact(retry=True):
                record = update(self.read_record(name))
                self.meta.set(name, json.dumps(record, sort_keys=True).encode(), retry=True)
                for other, value in (also or {}).items():
                    if value is None:
                        self.meta.delete(other, retry=True)
                    else:
                        self.meta.set(other, json.dumps(value, sort_keys=True).encode(), retry=True)
            return record

        return self.guarded("write record", apply)

    def delete_record(self, name: str) -> None:
        if not self.disabled and self.writable("delete record"):
            self.guarded("delete record", self.meta.delete, name, retry=True)

    def clear_records(self, keep: dict[str, dict] | None = None) -> None:
        """Remove every record, then write `keep` (name -> record), in one transaction."""
        if self.disabled or not self.writable("clear records"):
            return

        def apply():
            with self.meta.transact(retry=True):
                self.meta.clear(retry=True)
                for name, value in (keep or {}).items():
                    self.meta.set(name, json.dumps(value, sort_keys=True).encode(), retry=True)

        self.guarded("clear records", apply)


class Counters:
    """Statistics of one cache object, also added to the folder's persistent totals (for `hf-neuralcache cache stats`).

    Increments stay in memory and are flushed to the folder at most once a second, on `flush()` and when the object
    is garbage-collected or the process exits normally, so counting costs no disk write on the hot path. The store's
    failure counts (`storage_errors`, `integrity_errors`, `skipped`) are counted here too.
    """

    def __init__(self, store: TieredStore, names: tuple[str, ...]):
        self.store = store
        self.values: dict[str, float] = dict.fromkeys((*names, *ERROR_KINDS), 0)
        for name, count in store.errors.items():  # failures while the folder was opened
            self.values[name] += count
        self._unflushed: dict[str, float] = dict(store.errors)
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, Counters._flush_totals, store, self._unflushed, self._lock)
        store.counters = self

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
        if not pending or store.readonly is not None:
            return

        def add(record):
            for name, amount in pending.items():
                old = record.get(name, 0)
                record[name] = (old if isinstance(old, int | float) else 0) + amount
            return record

        store.update_record("stats", add)  # guarded: statistics never break generation


class StoreBackedCache:
    """What the hooks' caches share: a [`TieredStore`] and its [`Counters`], and the operations on both."""

    store: TieredStore
    counters: Counters

    def stats(self) -> dict:
        """This object's counters (listed in the class docstring; with `storage_errors`, `integrity_errors` and
        `skipped`, see [`TieredStore`]; `bypassed_by`: the bypassed calls by reason) plus the folder's `entries` and
        `bytes` on disk."""
        values = {name: v for name, v in self.counters.values.items() if not name.startswith(_BYPASS)}
        by = {name[len(_BYPASS) :]: v for name, v in self.counters.values.items() if name.startswith(_BYPASS)}
        self.store.settle()
        return {**values, "bypassed_by": by, "entries": len(self.store), "bytes": self.store.volume()}

    def bypass(self, reason: str, warn: bool = False) -> None:
        """Count a call that this cache does not take part in, by `reason`, and log each reason once (INFO, or
        WARNING when `warn`: a setting the user probably wants to change)."""
        self.counters.add("bypassed", 1)
        self.counters.add(f"{_BYPASS}{reason}", 1)
        logged = self.__dict__.setdefault("_bypass_logged", set())
        if reason not in logged:
            logged.add(reason)
            logger.log(logging.WARNING if warn else logging.INFO, "hf_neuralcache: %s cache %s bypassed a call: %s "
                       "(logged once per reason; counted in stats()['bypassed_by'])", self.store.kind,
                       self.store.directory, reason)  # fmt: skip

    def note_failure(self, kind: str, op: str, err: BaseException) -> None:
        """Count and log (once) a failure of this cache that happened outside its store."""
        self.store.failed(kind, op, err)

    def clear(self) -> None:
        """Remove every entry (all namespaces and models) from both tiers."""
        self.store.clear()

    def close(self) -> None:
        """Save the statistics and close the folder's database connections."""
        self.counters.flush()
        self.store.close()
