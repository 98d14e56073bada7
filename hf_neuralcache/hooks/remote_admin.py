"""Listing, statistics, pruning and clearing of the caches' keys on a Redis server (`hf-neuralcache cache ... URL`).

Every function takes a redis client and the key prefix (`hfnc` by default, see `remote.py` for the key layout) and
touches only keys of that layout:

    <prefix>:<kind>:<namespace>:<model16>:<key>     entries (kind: prefix, inference or semantic)
    <prefix>#lru:<kind>:<namespace>                 the LRU sorted set of a namespace with a byte bound
    <prefix>#size:<kind>:<namespace>                its sizes hash (field "total": their sum)
    <prefix>#log:<kind>:<namespace>:<name>          streams of the semantic cache

Any other key (another application's, or one under the prefix that does not parse as above) is never listed,
changed or removed. Keys are found with `SCAN` (never `KEYS`) and read and written in pipelines of bounded batches.
Listing reads only entry headers (`GETRANGE`); `prune` reads whole entries, one batch of at most `READ_BYTES` at a
time, and checks each with [`decode_entry`] exactly as a cache would before using it.

Reading a key resets its idle time on the server, which its `maxmemory-policy` may evict by; the functions ask the
server not to (`CLIENT NO-TOUCH ON`, Redis >= 7.2) and `prune` reads idle times before anything else.
"""

from __future__ import annotations

import math
import re
import struct
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..env import redis_credentials
from .remote import DEFAULT_PREFIX, RedisTier, _client_module, check_url, redact

__all__ = [
    "EntryInfo",
    "RemoteKey",
    "clear",
    "connect",
    "display_url",
    "list_entries",
    "parse_key",
    "prune",
    "stats",
]

KINDS = ("prefix", "inference", "semantic")
SCAN_COUNT = 500  # keys per SCAN round trip
BATCH = 256  # keys per pipeline
READ_BYTES = 64 << 20  # most entry bytes read in one pipeline by prune
HEAD_BYTES = 4096  # first read of an entry's header by ls
DETAILS = ("index", "chunk_tokens", "output", "request")  # the metadata `ls` shows, as for a folder

# Remove entries with their bookkeeping: DEL, ZREM from the LRU set, HDEL from the sizes hash and take their size
# off "total" (only where the namespace has the bookkeeping: nothing is created). Returns how many keys existed.
_REMOVE = """
local lru, sizes, removed = KEYS[1], KEYS[2], 0
for _, key in ipairs(ARGV) do
  removed = removed + redis.call('DEL', key)
  redis.call('ZREM', lru, key)
  local size = redis.call('HGET', sizes, key)
  if size then
    redis.call('HDEL', sizes, key)
    redis.call('HINCRBY', sizes, 'total', -tonumber(size))
  end
end
return removed
"""

# Drop bookkeeping members whose entry is gone (expired or deleted), atomic with the caches' bounded write script;
# returns how many keys were dropped.
_DROP_MISSING = """
local lru, sizes, dropped = KEYS[1], KEYS[2], 0
for _, key in ipairs(ARGV) do
  if redis.call('EXISTS', key) == 0 then
    if redis.call('ZREM', lru, key) + redis.call('HDEL', sizes, key) > 0 then dropped = dropped + 1 end
  end
end
return dropped
"""

# Set "total" to the sum of the sizes hash (deleting a hash with nothing left); returns the total.
_RECOMPUTE = """
local sizes, total, fields = KEYS[1], 0, 0
local all = redis.call('HGETALL', sizes)
for i = 1, #all, 2 do
  if all[i] ~= 'total' then
    total = total + (tonumber(all[i + 1]) or 0)
    fields = fields + 1
  end
end
if fields == 0 then redis.call('DEL', sizes) elseif #all > 0 then redis.call('HSET', sizes, 'total', total) end
return total
"""


# ---- connecting ------------------------------------------------------------------------------------------------------
def display_url(url: str) -> str:
    """`url` as it may be shown: [`redact`]ed, and without a `password=` query parameter."""
    shown = redact(url)
    try:
        parts = urllib.parse.urlsplit(shown)
    except ValueError:
        return shown
    if not parts.query:
        return shown
    query = [(name, "***" if name.lower() in ("password", "username") else value)
             for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]  # fmt: skip
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe="*")))


def _secrets(url: str) -> list[str]:
    """The credentials in `url` and the environment, to scrub from any message that is shown."""

    found = []
    try:
        parts = urllib.parse.urlsplit(url)
        found += [parts.password, parts.username]
        found += [v for n, v in urllib.parse.parse_qsl(parts.query) if n.lower() in ("password", "username")]
    except ValueError:
        pass
    found += [redis_credentials()[1]]
    return [s for s in found if s and len(s) >= 3]


def scrub(text: str, url: str) -> str:
    """`text` with every credential of `url` (and of the environment) replaced by `***`."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def connect(url: str, timeout: float = 5.0):
    """A redis client for `url` (credentials from the URL or the environment, as a cache's tier takes them) that has
    answered a `PING`, with `CLIENT NO-TOUCH ON` where the server has it.

    Raises:
        `ValueError`: for a URL that is not a Redis URL. `RuntimeError`: when the server cannot be reached or refuses
            the connection; the message names the server without its credentials.
    """
    check_url(url)
    redis = _client_module()
    try:
        client = RedisTier._connect(url, timeout)
        client.ping()
    except (redis.RedisError, OSError, ValueError) as err:
        raise RuntimeError(f"cannot use the Redis server {display_url(url)}: {type(err).__name__}: "
                           f"{scrub(str(err), url)}") from None  # fmt: skip
    try:
        client.execute_command("CLIENT", "NO-TOUCH", "ON")
    except redis.ResponseError:  # before Redis 7.2: reads reset idle times (prune reads them first)
        pass
    return client


# ---- keys ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteKey:
    """A Redis key of the cache layout: an entry (`model` and `key` set) or a bookkeeping key (`role` set)."""

    rkey: str
    kind: str
    namespace: str  # percent-encoded, as in the key ("" for none)
    model: str = ""
    key: str = ""
    role: str = "entry"  # "entry", "lru", "size" or "log"

    @property
    def group(self) -> tuple[str, str]:
        return self.kind, self.namespace

    @property
    def namespace_text(self) -> str:
        """The namespace decoded ("" for none)."""
        return urllib.parse.unquote(self.namespace)


def parse_key(rkey, prefix: str = DEFAULT_PREFIX) -> RemoteKey | None:
    """`rkey` (bytes or str) as a [`RemoteKey`], or `None` when it is not a key of the caches' layout under `prefix`."""
    if isinstance(rkey, bytes):
        try:
            rkey = rkey.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if rkey.startswith(f"{prefix}:"):
        parts = rkey[len(prefix) + 1 :].split(":")
        if len(parts) != 4 or parts[0] not in KINDS or not parts[3] or not _encoded(parts[1]):
            return None
        return RemoteKey(rkey, parts[0], parts[1], parts[2], parts[3])
    for role in ("lru", "size", "log"):
        if rkey.startswith(f"{prefix}#{role}:"):
            parts = rkey[len(prefix) + len(role) + 2 :].split(":")
            if len(parts) != (3 if role == "log" else 2) or parts[0] not in KINDS or not _encoded(parts[1]):
                return None
            return RemoteKey(rkey, parts[0], parts[1], role=role)
    return None


def _encoded(namespace: str) -> bool:
    return urllib.parse.quote(urllib.parse.unquote(namespace), safe="") == namespace


def _glob(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _patterns(prefix: str, kind: str | None, namespace: str | None) -> list[str]:
    """SCAN patterns that cover the entries and bookkeeping keys of `kind` / `namespace` (`None`: any)."""
    kind_part = _glob(kind) if kind is not None else "*"
    ns_part = f":{_glob(urllib.parse.quote(namespace, safe=''))}" if namespace is not None else ""
    p = _glob(prefix)
    if kind is None and namespace is None:
        return [f"{p}:*", f"{p}#*"]
    return [f"{p}:{kind_part}{ns_part}:*", f"{p}#*:{kind_part}{ns_part}", f"{p}#log:{kind_part}{ns_part}:*"]


def scan_keys(client, prefix: str = DEFAULT_PREFIX, kind: str | None = None, namespace: str | None = None,
              roles: Iterable[str] = ("entry", "lru", "size", "log")) -> list[RemoteKey]:  # fmt: skip
    """Every key of the layout under `prefix` with `kind` and `namespace` (`None`: any; `""`: no namespace) and a
    role in `roles`, sorted, each once (SCAN may return a key twice)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    wanted_ns = None if namespace is None else urllib.parse.quote(namespace, safe="")
    roles, found = set(roles), {}
    for pattern in _patterns(prefix, kind, namespace):
        for raw in client.scan_iter(match=pattern, count=SCAN_COUNT):
            parsed = parse_key(raw, prefix)
            if parsed is None or parsed.role not in roles:
                continue
            if (kind is not None and parsed.kind != kind) or (wanted_ns is not None and parsed.namespace != wanted_ns):
                continue
            found[parsed.rkey] = parsed
    return sorted(found.values(), key=lambda k: (k.kind, k.namespace, k.role, k.model, k.key))


def _batches(items: list, size: int = BATCH) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _run(client, commands: Iterable[tuple]) -> list:
    """The replies of `commands` (`(method name, *args)` of a redis-py pipeline) in one pipeline, no transaction; a
    failed command's reply is its exception."""
    pipe = client.pipeline(transaction=False)
    for name, *args in commands:
        getattr(pipe, name)(*args)
    return pipe.execute(raise_on_error=False)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---- headers ---------------------------------------------------------------------------------------------------------
def _header_span(head: bytes) -> tuple[int, int] | str:
    """Where the safetensors header of an entry starting with `head` lies, or why the bytes are no entry."""
    from .storage import _HEADER, _MAC_BYTES, MAGIC, RECORD_LIMIT, STORAGE_VERSION

    if len(head) < _HEADER + 8 or head[: len(MAGIC)] != MAGIC:
        return "not an hf_neuralcache entry"
    if head[len(MAGIC)] != STORAGE_VERSION:
        return f"storage version {head[len(MAGIC)]}, expected {STORAGE_VERSION}"
    flags = head[len(MAGIC) + 1]
    if flags not in (0, 1):
        return f"unknown entry flags {flags}"
    start = _HEADER + (_MAC_BYTES if flags else 0)
    if len(head) < start + 8:
        return "truncated entry"
    (length,) = struct.unpack("<Q", head[start : start + 8])
    if length > RECORD_LIMIT:
        return "header too large"
    return start + 8, start + 8 + length


def _metadata(header: bytes, key: str) -> dict | str:
    """The cache metadata in a safetensors header, or why it cannot be read (not checked against the checksum)."""
    from .storage import parse_json_object

    try:
        parsed = parse_json_object(header, limit=len(header) + 1)
        meta = parse_json_object(parsed["__metadata__"]["hf_neuralcache"])
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable header ({type(err).__name__})"
    if meta.get("key") != key:
        return "the entry names another key"
    return meta


@dataclass
class EntryInfo:
    """What `ls` shows of one entry: its key, bytes, seconds left (`None`: no expiry) and metadata, or why it is
    unreadable (`problem`; `meta` is then `None`)."""

    key: RemoteKey
    nbytes: int
    ttl: float | None
    meta: dict | None = None
    problem: str | None = None

    @property
    def details(self) -> dict:
        return {k: v for k, v in (self.meta or {}).items() if k in DETAILS}


def describe(client, keys: list[RemoteKey]) -> list[EntryInfo]:
    """Size, TTL and header metadata of the entries `keys` (entries gone meanwhile are left out)."""
    infos = []
    for batch in _batches(keys):
        replies = _run(client, [c for k in batch for c in (("pttl", k.rkey), ("type", k.rkey), ("strlen", k.rkey),
                                                            ("getrange", k.rkey, 0, HEAD_BYTES - 1))])  # fmt: skip
        pending = []
        for n, k in enumerate(batch):
            pttl, kind, size, head = replies[4 * n : 4 * n + 4]
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if _int(pttl) == -2 or kind == "none":
                continue  # gone since the scan
            ttl = pttl / 1000 if _int(pttl) is not None and pttl >= 0 else None
            if kind != "string":
                infos.append(EntryInfo(k, 0, ttl, problem=f"a Redis {kind}, not an entry"))
                continue
            info = EntryInfo(k, _int(size) or 0, ttl)
            infos.append(info)
            span = _header_span(head if isinstance(head, bytes) else b"")
            if isinstance(span, str):
                info.problem = span
            elif span[1] <= len(head):
                _set_meta(info, head[span[0] : span[1]])
            elif span[1] > info.nbytes:
                info.problem = "truncated entry"
            else:
                pending.append((info, span))
        if pending:  # headers longer than the first read
            replies = _run(client, [("getrange", info.key.rkey, start, end - 1) for info, (start, end) in pending])
            for (info, _), header in zip(pending, replies, strict=True):
                _set_meta(info, header if isinstance(header, bytes) else b"")
    return infos


def _set_meta(info: EntryInfo, header: bytes) -> None:
    meta = _metadata(header, info.key.key)
    if isinstance(meta, str):
        info.problem = meta
    else:
        info.meta = meta


def list_entries(client, prefix: str = DEFAULT_PREFIX, kind: str | None = None, namespace: str | None = None,
                 limit: int | None = None) -> tuple[list[EntryInfo], int]:  # fmt: skip
    """The first `limit` entries (sorted by kind, namespace, model and key) described, and how many there are."""
    keys = scan_keys(client, prefix, kind, namespace, roles=("entry",))
    return describe(client, keys if limit is None else keys[:limit]), len(keys)


# ---- stats -----------------------------------------------------------------------------------------------------------
@dataclass
class GroupStats:
    """Entries and bytes of one kind and namespace, and its bookkeeping."""

    kind: str
    namespace: str  # decoded
    entries: int = 0
    bytes: int = 0
    not_strings: int = 0  # values of another Redis type under an entry key
    recorded_total: int | None = None  # the sizes hash's "total" (a namespace with a byte bound)
    lru_members: int | None = None
    logs: int = 0


def stats(client, prefix: str = DEFAULT_PREFIX, kind: str | None = None, namespace: str | None = None) -> dict:
    """`{"groups": [GroupStats], "server": {...}}`: entries and bytes per kind and namespace, and what the server
    says of its memory (`used_memory`, `maxmemory`, `maxmemory-policy`; `None` where it does not say, e.g. CONFIG
    disabled)."""
    redis = _client_module()
    groups: dict[tuple[str, str], GroupStats] = {}

    def group(k: RemoteKey) -> GroupStats:
        if k.group not in groups:
            groups[k.group] = GroupStats(k.kind, k.namespace_text)
        return groups[k.group]

    keys = scan_keys(client, prefix, kind, namespace)
    entries = [k for k in keys if k.role == "entry"]
    for batch in _batches(entries):
        replies = _run(client, [c for k in batch for c in (("type", k.rkey), ("strlen", k.rkey))])
        for n, k in enumerate(batch):
            kind_reply, size = replies[2 * n : 2 * n + 2]
            kind_reply = kind_reply.decode() if isinstance(kind_reply, bytes) else str(kind_reply)
            if kind_reply == "none":
                continue
            g = group(k)
            g.entries += 1
            if kind_reply == "string":
                g.bytes += _int(size) or 0
            else:
                g.not_strings += 1
    books = [k for k in keys if k.role in ("lru", "size")]
    replies = _run(client, [("zcard", k.rkey) if k.role == "lru" else ("hget", k.rkey, "total") for k in books])
    for k, reply in zip(books, replies, strict=True):
        if isinstance(reply, Exception):
            continue
        if k.role == "lru":
            group(k).lru_members = _int(reply)
        elif reply is not None:
            try:
                group(k).recorded_total = int(reply)
            except ValueError:
                pass
    for k in keys:
        if k.role == "log":
            group(k).logs += 1
    server: dict[str, Any] = {"used_memory": None, "maxmemory": None, "maxmemory-policy": None, "version": None}
    try:
        info = client.info("memory")
        server["used_memory"] = info.get("used_memory")
        server["maxmemory"] = info.get("maxmemory")  # INFO has these too where CONFIG is renamed away
        server["maxmemory-policy"] = info.get("maxmemory_policy")
        server["version"] = client.info("server").get("redis_version")
    except redis.ResponseError:
        pass
    try:
        config = client.config_get("maxmemory*")
        server["maxmemory"] = int(config.get("maxmemory", server["maxmemory"] or 0))
        server["maxmemory-policy"] = config.get("maxmemory-policy", server["maxmemory-policy"])
    except (redis.ResponseError, ValueError):
        pass
    return {"groups": [groups[g] for g in sorted(groups)], "server": server}


# ---- prune -----------------------------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    """What `prune` did to one kind and namespace."""

    kind: str
    namespace: str  # decoded
    expired: int = 0
    bad: int = 0
    evicted: int = 0
    stale: int = 0  # bookkeeping members without an entry, dropped
    left: int = 0
    bytes: int = 0
    order: str = ""  # how entries were ordered for eviction
    problems: list[str] = field(default_factory=list)


def _remove(client, group: tuple[str, str], prefix: str, rkeys: list[str]) -> int:
    lru, sizes = f"{prefix}#lru:{group[0]}:{group[1]}", f"{prefix}#size:{group[0]}:{group[1]}"
    script = client.register_script(_REMOVE)
    return sum(script(keys=[lru, sizes], args=batch) for batch in _batches(rkeys))


def prune(
    client,
    prefix: str = DEFAULT_PREFIX,
    kind: str | None = None,
    namespace: str | None = None,
    max_bytes: int | None = None,
    secret: bytes | None = None,
    now: float | None = None,
) -> list[PruneResult]:
    """Check every entry of `kind` / `namespace` and remove the bad and expired ones; with `max_bytes`, then evict
    each (kind, namespace) down to that many bytes, least recently used first; last, drop bookkeeping members whose
    entry is gone and recompute each sizes hash's "total".

    An entry is bad when [`decode_entry`] refuses it (not an hf_neuralcache blob, damaged, naming another key, or,
    with `secret`, without a valid MAC for it: as a cache with that secret would), or when it is not a Redis string.
    It is expired when its metadata's `expires_at` has passed (the server normally expires it first).

    Eviction order: the last use is the entry's score in the namespace's LRU sorted set (a namespace with a byte
    bound), else `now - OBJECT IDLETIME` (read before anything else touches the entry); where the server has no idle
    time (an LFU `maxmemory-policy`), entries soonest to expire go first, those without expiry last.
    """
    from .storage import CorruptEntryError, decode_entry

    now = time.time() if now is None else now
    keys = scan_keys(client, prefix, kind, namespace)
    grouped: dict[tuple[str, str], list[RemoteKey]] = defaultdict(list)
    for k in keys:
        grouped[k.group].append(k)
    results = []
    for group, members in sorted(grouped.items()):
        result = PruneResult(group[0], urllib.parse.unquote(group[1]))
        results.append(result)
        entries = [k for k in members if k.role == "entry"]
        lru_key = f"{prefix}#lru:{group[0]}:{group[1]}"
        sizes_key = f"{prefix}#size:{group[0]}:{group[1]}"
        # 1. what each entry is, its idle time first (every later read resets it on a server without NO-TOUCH)
        known: dict[str, dict] = {}
        for batch in _batches(entries):
            replies = _run(client, [c for k in batch for c in (("object", "idletime", k.rkey), ("pttl", k.rkey),
                                    ("type", k.rkey), ("strlen", k.rkey), ("zscore", lru_key, k.rkey))])  # fmt: skip
            for n, k in enumerate(batch):
                idle, pttl, type_, size, score = replies[5 * n : 5 * n + 5]
                type_ = type_.decode() if isinstance(type_, bytes) else str(type_)
                if type_ == "none":
                    continue
                last = float(score) if isinstance(score, float | int) else None
                if last is None and _int(idle) is not None:
                    last = now - idle
                known[k.rkey] = {"key": k, "type": type_, "size": _int(size) or 0, "last": last,
                                 "ttl": pttl / 1000 if _int(pttl) is not None and pttl >= 0 else math.inf}  # fmt: skip
        # 2. check every entry as a cache would
        bad, expired = [], []
        bad += [r for r, e in known.items() if e["type"] != "string"]
        strings = [e for e in known.values() if e["type"] == "string"]
        batch, batch_bytes = [], 0
        for n, entry in enumerate(strings):
            batch.append(entry)
            batch_bytes += entry["size"]
            if n + 1 < len(strings) and len(batch) < BATCH and batch_bytes < READ_BYTES:
                continue
            blobs = _run(client, [("get", e["key"].rkey) for e in batch])
            for e, blob in zip(batch, blobs, strict=True):
                if blob is None:
                    known.pop(e["key"].rkey)  # gone since
                    continue
                try:
                    _, meta = decode_entry(e["key"].key, blob, secret)
                except CorruptEntryError:
                    bad.append(e["key"].rkey)
                    continue
                expires = meta.get("expires_at")
                if isinstance(expires, int | float) and expires <= now:
                    expired.append(e["key"].rkey)
            batch, batch_bytes = [], 0
        result.bad = _remove(client, group, prefix, bad) if bad else 0
        result.expired = _remove(client, group, prefix, expired) if expired else 0
        for rkey in (*bad, *expired):
            known.pop(rkey, None)
        # 3. evict down to max_bytes
        total = sum(e["size"] for e in known.values())
        if max_bytes is not None and total > max_bytes:
            with_last = [e for e in known.values() if e["last"] is not None]
            result.order = "least recently used" if len(with_last) == len(known) else (
                "least recently used, then soonest to expire")  # fmt: skip
            ranked = sorted(known.values(), key=lambda e: (0, e["last"], 0) if e["last"] is not None
                            else (1, 0, e["ttl"]))  # fmt: skip
            victims = []
            for e in ranked:
                if total <= max_bytes:
                    break
                victims.append(e["key"].rkey)
                total -= e["size"]
            result.evicted = _remove(client, group, prefix, victims)
            for rkey in victims:
                known.pop(rkey, None)
        # 4. bookkeeping: members without an entry, then "total"
        books = {k.role for k in members}
        if "lru" in books or "size" in books:
            stale = set()
            if "lru" in books:
                stale |= {
                    m.decode() if isinstance(m, bytes) else m for m, _ in client.zscan_iter(lru_key, count=SCAN_COUNT)
                }
            if "size" in books:
                stale |= {
                    f.decode() if isinstance(f, bytes) else f for f, _ in client.hscan_iter(sizes_key, count=SCAN_COUNT)
                }
            stale.discard("total")
            stale -= set(known)
            drop = client.register_script(_DROP_MISSING)
            result.stale = sum(drop(keys=[lru_key, sizes_key], args=b) for b in _batches(sorted(stale)))
            if "size" in books:
                client.register_script(_RECOMPUTE)(keys=[sizes_key])
        result.left = len(known)
        result.bytes = sum(e["size"] for e in known.values())
    return results


# ---- clear -----------------------------------------------------------------------------------------------------------
def clear(client, prefix: str = DEFAULT_PREFIX, kind: str | None = None, namespace: str | None = None) -> dict:
    """Remove every entry of `kind` / `namespace` (`None`: all) and its bookkeeping and logs (`UNLINK`, in batches);
    returns `{"entries": n, "other": n}` removed."""
    keys = scan_keys(client, prefix, kind, namespace)
    removed = {"entries": 0, "other": 0}
    for role, selected in (("entries", [k for k in keys if k.role == "entry"]),
                           ("other", [k for k in keys if k.role != "entry"])):  # fmt: skip
        for batch in _batches(selected):
            removed[role] += client.unlink(*[k.rkey for k in batch])
    return removed
