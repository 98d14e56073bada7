"""A shared remote tier on Redis behind the local RAM and disk tiers of the generate() hooks.

Lookups go RAM -> local disk -> Redis; a Redis hit is checked exactly like a disk read (the same blob: magic,
checksum, the MAC when a secret is set, the key it names) and then fills the local tiers. Writes go to the local tiers
first and are handed to one background writer per tier, so a request never waits for Redis to take a write.

**Failure is never fatal.** Every command runs with a short socket timeout (`timeout`, 0.1 s by default) and no
retries; the first failure opens a circuit breaker: for `retry_seconds` (doubling up to a minute while the server
stays away) every remote operation is a miss or a skipped write that costs nothing, then one command probes the server
again. A request therefore pays at most one timeout per probe, and only the request that makes the probe. Each
outage is logged once as a warning (the URL without its credentials) and counted in the cache's `stats()`
(`storage_errors`, `skipped`).

Redis keys (all under `prefix`, `hfnc` by default):

    hfnc:<kind>:<namespace>:<model>:<key>       an entry (the blob), with a Redis expiry when it has a TTL
    hfnc#lru:<kind>:<namespace>                 sorted set key -> last use, only with a per-namespace byte bound
    hfnc#size:<kind>:<namespace>                hash key -> bytes, and the field "total", only with that bound
    hfnc#log:<kind>:<namespace>:<embedder>      the semantic cache's stream of additions and removals

`<namespace>` is the cache's namespace percent-encoded (empty for none) and `<model>` the first 16 hex digits of the
model's fingerprint, so several models, tenants and cache kinds share one Redis and can be listed and cleared apart
(`hf-neuralcache cache ls|stats|prune|clear redis://...`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from ..env import redis_credentials

logger = logging.getLogger("hf_neuralcache.hooks")

__all__ = ["RedisTier", "redact", "remote_tier"]

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PREFIX = "hfnc"
_MAX_BACKOFF = 60.0

# Server-side write with a per-namespace byte bound: set the entry, account its size, then drop the least recently
# used entries of the namespace until the total fits (never the one just written). Keys the script touches besides
# KEYS are entries of the same namespace, which a standalone Redis allows.
_BOUNDED_SET = """
local key, lru, sizes = KEYS[1], KEYS[2], KEYS[3]
local size, px, now, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local old = tonumber(redis.call('HGET', sizes, key) or '0')
if px > 0 then redis.call('SET', key, ARGV[1], 'PX', px) else redis.call('SET', key, ARGV[1]) end
redis.call('ZADD', lru, now, key)
redis.call('HSET', sizes, key, size)
local total = redis.call('HINCRBY', sizes, 'total', size - old)
local removed = 0
while total > limit do
  local oldest = redis.call('ZRANGE', lru, 0, 0)
  if #oldest == 0 or oldest[1] == key then break end
  local victim = oldest[1]
  total = redis.call('HINCRBY', sizes, 'total', -tonumber(redis.call('HGET', sizes, victim) or '0'))
  redis.call('ZREM', lru, victim)
  redis.call('HDEL', sizes, victim)
  redis.call('DEL', victim)
  removed = removed + 1
end
return removed
"""


# Removal under a per-namespace byte bound: the entry, its place in the LRU order and its bytes in the total.
_BOUNDED_DELETE = """
local key, lru, sizes = KEYS[1], KEYS[2], KEYS[3]
local size = tonumber(redis.call('HGET', sizes, key) or '0')
redis.call('DEL', key)
redis.call('ZREM', lru, key)
if redis.call('HDEL', sizes, key) == 1 then redis.call('HINCRBY', sizes, 'total', -size) end
return size
"""


def redact(url: str) -> str:
    """`url` without its username and password, in the authority or the query (what is logged and shown)."""
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        netloc = "***@" + netloc.rpartition("@")[2]
    hidden = {"password", "username", "user", "pass"}
    text = parts.query
    if any(name.lower() in hidden for name, _ in query):
        query = [(name, "***" if name.lower() in hidden else value) for name, value in query]
        text = urllib.parse.urlencode(query, safe="*")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{text}" if text else "")


def check_url(url) -> str:
    """`url` when it names a Redis server (`redis://`, `rediss://` or `unix://`).

    Raises:
        `ValueError`: for anything else.
    """
    if not isinstance(url, str):
        raise ValueError(f"remote must be a Redis URL (redis://host:6379/0) or None, got {type(url).__name__}")
    try:
        scheme = urllib.parse.urlsplit(url).scheme
    except ValueError as err:
        raise ValueError(f"remote {redact(url)!r} is not a URL ({err})") from None
    if scheme not in SCHEMES:
        raise ValueError(
            f"remote must be a Redis URL with scheme redis://, rediss:// (TLS) or unix://, got {redact(url)!r}"
        )
    return url


def _client_module():
    try:
        import redis
    except ImportError:
        raise ImportError(
            "a Redis remote tier needs the redis client library: pip install 'hf-neuralcache[redis]'"
        ) from None
    return redis


def _quote(text: str | None) -> str:
    return urllib.parse.quote(text or "", safe="")


class _Breaker:
    """The circuit breaker of one Redis server, shared by every tier of this process that uses its URL: a server
    that failed for one cache is skipped by all of them, so a request through several caches pays one timeout."""

    def __init__(self, retry_seconds: float):
        self.retry_seconds = retry_seconds
        self.open_until = 0.0
        self.backoff = retry_seconds
        self.lock = threading.Lock()

    def fail(self) -> tuple[bool, float]:
        """Open (or keep open) the breaker; returns whether it was closed until now, and the wait."""
        with self.lock:
            first, wait = self.open_until == 0.0, self.backoff
            self.open_until = time.monotonic() + wait
            self.backoff = min(self.backoff * 2, _MAX_BACKOFF)
        return first, wait

    def succeed(self) -> bool:
        """Close the breaker; returns whether it was open."""
        if not self.open_until:
            return False
        with self.lock:
            was, self.open_until, self.backoff = bool(self.open_until), 0.0, self.retry_seconds
        return was


_breakers: dict[tuple[str, float], _Breaker] = {}
_breakers_lock = threading.Lock()


def _breaker(url: str, retry_seconds: float) -> _Breaker:
    with _breakers_lock:
        return _breakers.setdefault((url, retry_seconds), _Breaker(retry_seconds))


@dataclass
class _Write:
    key: str
    blob: bytes | Callable[[], bytes]  # or a function making it, called by the writer (off the request's path)
    px: int  # milliseconds to live, 0: no expiry
    done: threading.Event | None = None
    call: Callable[[], object] | None = None  # a command to run in turn instead of a write (`later`)
    nbytes: int = 0  # what the item counts against `queue_bytes`


class RedisTier:
    """One cache's remote tier on a Redis server, failures as misses (see the module docstring).

    Args:
        url (`str`): `redis://[[username]:password@]host[:port][/db]`, `rediss://...` (TLS) or
            `unix:///path/to/socket?db=0`. A username and password missing from the URL are taken from
            `HF_NEURALCACHE_REDIS_USERNAME` / `HF_NEURALCACHE_REDIS_PASSWORD`; neither is ever logged.
        kind (`str`): The cache kind (`"prefix"`, `"inference"`, `"semantic"`).
        namespace (`str`, *optional*): The cache's namespace (part of every key).
        timeout (`float`, *optional*, defaults to 0.1): Seconds a connect or a reply may take before the tier is
            skipped; the most a request waits on a hung or unreachable server.
        retry_seconds (`float`, *optional*, defaults to 5.0): How long the tier is skipped after a failure before
            the server is tried again (doubling up to 60 s while it keeps failing). The tiers of one process with the
            same URL and `retry_seconds` share their breaker: a failure seen by one cache skips the server for all.
        max_bytes (`int`, *optional*): Bound of this kind and namespace in Redis (least recently used entries go
            first); `None` leaves the bound to the server's `maxmemory` policy.
        queue_bytes (`int`, *optional*, defaults to 512 MiB): Writes waiting for the background writer beyond this
            are dropped (counted as skipped).
        prefix (`str`, *optional*, defaults to `"hfnc"`): First part of every key.
    """

    def __init__(
        self,
        url: str,
        kind: str,
        namespace: str | None = None,
        timeout: float = 0.1,
        retry_seconds: float = 5.0,
        max_bytes: int | None = None,
        queue_bytes: int = 512 << 20,
        prefix: str = DEFAULT_PREFIX,
        client=None,
    ):
        self.url = check_url(url)
        for name, value in (("timeout", timeout), ("retry_seconds", retry_seconds)):
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be seconds > 0, got {value!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
            raise ValueError(f"remote_bytes must be an int >= 1 (bytes) or None, got {max_bytes!r}")
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in ":#"):
            raise ValueError(f"prefix must be a non-empty str without ':' or '#', got {prefix!r}")
        self.kind, self.namespace, self.prefix = kind, namespace, prefix
        self.timeout, self.retry_seconds, self.max_bytes = float(timeout), float(retry_seconds), max_bytes
        self.queue_bytes = queue_bytes
        self.client = client if client is not None else self._connect(url, timeout)
        self.on_failure = None  # callback(kind, op, err, logged): the owning store counts (and logs skips)
        self.breaker = _breaker(url, self.retry_seconds)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        self._queued = 0
        self._writer: threading.Thread | None = None
        self._script = None

    @staticmethod
    def _connect(url: str, timeout: float):
        redis = _client_module()
        options = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0),  # a failure opens the breaker instead
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }
        parts = urllib.parse.urlsplit(url)
        username, password = redis_credentials()
        if parts.password is None and password:
            options["password"] = password
        if parts.username is None and username:
            options["username"] = username
        return redis.Redis.from_url(url, **options)

    def __repr__(self):
        return f"RedisTier({redact(self.url)!r}, kind={self.kind!r})"

    # ---- keys ---------------------------------------------------------------------------------------------------
    def key(self, key: str, model: str = "") -> str:
        """The Redis key of the entry `key` of model fingerprint `model`."""
        return f"{self.prefix}:{self.kind}:{_quote(self.namespace)}:{model[:16]}:{key}"

    @property
    def lru_key(self) -> str:
        return f"{self.prefix}#lru:{self.kind}:{_quote(self.namespace)}"

    @property
    def sizes_key(self) -> str:
        return f"{self.prefix}#size:{self.kind}:{_quote(self.namespace)}"

    def log_key(self, name: str) -> str:
        """The Redis key of a stream of this kind and namespace (`name`: what it is a log of, e.g. an embedder)."""
        return f"{self.prefix}#log:{self.kind}:{_quote(self.namespace)}:{_quote(name)}"

    # ---- the circuit breaker ------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether the tier is tried now (the breaker is closed, or its wait is over and the next call probes)."""
        return time.monotonic() >= self.breaker.open_until

    def _failed(self, op: str, err: BaseException) -> None:
        first, wait = self.breaker.fail()
        if first:
            logger.warning("hf_neuralcache: Redis tier %s of the %s cache failed on %s (%s: %s); skipped for %.0f s, "
                           "then retried (requests go on without it)", redact(self.url), self.kind, op,
                           type(err).__name__, err, wait)  # fmt: skip
        if self.on_failure is not None:
            self.on_failure("storage", f"redis {op}", err, logged=True)  # logged above, once per outage

    def _succeeded(self) -> None:
        if self.breaker.open_until and self.breaker.succeed():
            logger.warning("hf_neuralcache: Redis tier %s of the %s cache is back", redact(self.url), self.kind)

    def call(self, op: str, fn, *args, default=None, **kwargs):
        """`fn(*args, **kwargs)` on the server, or `default` when the breaker is open or the call fails."""
        if not self.available:
            return default
        redis = _client_module()
        try:
            result = fn(*args, **kwargs)
        except (redis.RedisError, OSError, ValueError) as err:
            self._failed(op, err)
            return default
        self._succeeded()
        return result

    # ---- entries ------------------------------------------------------------------------------------------------
    def get(self, rkey: str) -> bytes | None:
        """The bytes under `rkey`, or `None` (missing, or the tier is skipped). With a byte bound, the same round
        trip marks the entry used (its place in the namespace's least-recently-used order)."""
        if self.max_bytes is None:
            value = self.call("get", self.client.get, rkey)
        else:

            def get_and_touch():
                pipe = self.client.pipeline(transaction=False)
                pipe.get(rkey)
                pipe.zadd(self.lru_key, {rkey: time.time()}, xx=True)
                return pipe.execute()[0]

            value = self.call("get", get_and_touch)
        return value if isinstance(value, bytes) else None

    def get_many(self, rkeys: list[str]) -> list[bytes | None]:
        """The bytes under each of `rkeys` in one round trip (`None` for each missing one, or for all when the tier
        is skipped)."""
        values = self.call("get", self.client.mget, rkeys, default=None) if rkeys else []
        if not isinstance(values, list) or len(values) != len(rkeys):
            return [None] * len(rkeys)
        return [value if isinstance(value, bytes) else None for value in values]

    def exists(self, rkey: str) -> bool:
        return bool(self.call("exists", self.client.exists, rkey, default=0))

    def delete(self, rkey: str) -> None:
        """Remove `rkey` (a bad or removed entry); skipped when the tier is. While writes handed over earlier still
        wait for the background writer, the removal waits behind them (a removal is never overtaken by a write)."""

        def remove():
            if self.max_bytes is None:
                self.client.delete(rkey)
            else:  # keep the namespace's byte total right: a stale total would evict more than the bound asks
                self.client.eval(_BOUNDED_DELETE, 3, rkey, self.lru_key, self.sizes_key)

        if self._queue.empty() or not self.later("delete", remove):
            self.call("delete", remove)

    # ---- streams ------------------------------------------------------------------------------------------------
    def append(self, stream: str, data: bytes, maxlen: int) -> bool:
        """Add the event `data` to `stream` (kept to about `maxlen` events) after the writes handed over so far."""
        return self.later(
            "append", lambda: self.client.xadd(stream, {"e": data}, maxlen=maxlen, approximate=True), len(data)
        )

    def read_log(self, stream: str, after: str, count: int) -> tuple[list, bytes | None] | None:
        """`(events, newest)`: up to `count` events of `stream` after the id `after` as `[(id, fields)]`, and the id
        of the newest event (`None`: the stream is empty or gone), in one round trip; `None` when the tier is
        skipped or the call fails."""

        def read():
            pipe = self.client.pipeline(transaction=False)
            pipe.xread({stream: after}, count=count)
            pipe.xrevrange(stream, count=1)
            found, newest = pipe.execute()
            events = found[0][1] if found else []  # [[stream, [(id, fields), ...]]] (RESP2, redis-py's default)
            return list(events), newest[0][0] if newest else None

        return self.call("read log", read)

    def put(self, rkey: str, blob, ttl: float | None = None, wait: bool = False, size: int | None = None) -> bool:
        """Hand `blob` (bytes, or a function returning them, called by the writer; `size` estimates its length) to
        the background writer, or with `wait` write it now. Returns whether it was taken."""
        if ttl is not None and ttl <= 0:
            return False
        px = 0 if ttl is None else max(int(ttl * 1000), 1)
        size = len(blob) if isinstance(blob, bytes) else int(size or 0)
        if wait:
            return self._write(_Write(rkey, blob, px, nbytes=size))
        return self._enqueue(_Write(rkey, blob, px, nbytes=size))

    def later(self, op: str, call: Callable[[], object], nbytes: int = 0) -> bool:
        """Run `call()` on the background writer after the writes handed over so far (so that, for example, a
        stream event naming an entry is never seen before the entry). Returns whether it was taken."""
        return self._enqueue(_Write(op, b"", 0, call=call, nbytes=nbytes))

    def _enqueue(self, item: _Write) -> bool:
        nbytes = item.nbytes = item.nbytes or (len(item.blob) if isinstance(item.blob, bytes) else 0)
        op = "write" if item.call is None else item.key
        if not self.available:
            self._skip(op, "the Redis tier is skipped after a failure")
            return False
        with self._lock:
            if self._queued + nbytes > self.queue_bytes:
                full = True
            else:
                full, self._queued = False, self._queued + nbytes
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._drain, name="hf_neuralcache-redis-writer", daemon=True)
                self._writer.start()
        if full:
            self._skip(op, f"more than {self.queue_bytes} bytes wait for Redis")
            return False
        self._queue.put(item)
        return True

    def _skip(self, op: str, why: str) -> None:
        if self.on_failure is not None:
            self.on_failure("skipped", f"redis {op}", RuntimeError(why))

    def _write(self, item: _Write) -> bool:
        if not self.available:
            return False
        if callable(item.blob):
            item.blob = item.blob()
        if self.max_bytes is None:
            return bool(self.call("set", self.client.set, item.key, item.blob, px=item.px or None, default=False))
        if self._script is None:
            self._script = self.client.register_script(_BOUNDED_SET)
        keys = [item.key, self.lru_key, self.sizes_key]
        args = [item.blob, len(item.blob), item.px, time.time(), self.max_bytes]
        return self.call("set", self._script, keys=keys, args=args, default=None) is not None

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if item.done is not None:
                    item.done.set()
                    continue
                if not self.available:
                    self._skip("write" if item.call is None else item.key, "the Redis tier is skipped after a failure")
                elif item.call is not None:
                    self.call(item.key, item.call)
                else:
                    self._write(item)
            finally:
                if item is not None and item.done is None:
                    with self._lock:
                        self._queued -= item.nbytes
                self._queue.task_done()

    def clear(self) -> int:
        """Remove every entry of this kind and namespace (every model) and its bookkeeping; returns how many."""
        pattern = f"{self.prefix}:{self.kind}:{_quote(self.namespace)}:*"

        def remove():
            removed, batch = 0, []
            for rkey in self.client.scan_iter(match=pattern, count=1000):
                batch.append(rkey)
                if len(batch) == 1000:
                    removed += self.client.delete(*batch)
                    batch = []
            if batch:
                removed += self.client.delete(*batch)
            self.client.delete(self.lru_key, self.sizes_key)
            return removed

        return self.call("clear", remove, default=0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the writes handed over so far are done (written or dropped); returns whether they were."""
        with self._lock:
            alive = self._writer is not None and self._writer.is_alive()
        if not alive:
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(_Write("", b"", 0, done))
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the pending writes (waiting at most `timeout` seconds) and close the connections."""
        self.flush(timeout)
        self._queue.put(None)
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing never raises
            pass


def remote_tier(remote, kind: str, namespace: str | None, **options) -> RedisTier | None:
    """A cache's `remote=` argument as a [`RedisTier`]: `None`, a Redis URL, or a tier made for this kind."""
    if remote is None:
        return None
    if isinstance(remote, RedisTier):
        if remote.kind != kind or remote.namespace != namespace:
            raise ValueError(f"remote tier {remote!r} was made for the {remote.kind!r} cache of namespace "
                             f"{remote.namespace!r}, not the {kind!r} cache of {namespace!r}")  # fmt: skip
        return remote
    return RedisTier(remote, kind, namespace, **options)
