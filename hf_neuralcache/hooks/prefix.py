"""A persistent prefix (prefill) KV cache: prompts that start alike share the K/V of their common start.

A prompt's real tokens (padding excluded) are cut into chunks of `chunk_tokens`. Chunk `i` is stored under
`chain_key(key of chunk i-1, tokens of chunk i)`, the chain starting from a root key made of the model fingerprint,
the *regime* (cache implementation, its `cache_config` and the attention implementation: a sliding window computes
other K/V than full attention, so their entries never mix) and the namespace. An entry holds that chunk's K/V for
every layer, as safetensors. A new prompt walks the chain from the root while chunks exist: the longest cached
chunk-aligned prefix wins, and at least the prompt's last token is always recomputed (generate needs its logits).

Loading is only worth it when it beats recomputing: the cache measures, on the running machine, the prefill time per
token of each model and the bytes per second each tier delivers, and loads the prefix length with the largest
predicted saving, or nothing (see [`PrefixCache.plan`]).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .fingerprint import chain_key, digest, model_fingerprint
from .remote import remote_tier
from .storage import Counters, StoreBackedCache, TieredStore

logger = logging.getLogger("hf_neuralcache.hooks")

__all__ = ["PrefixCache", "PrefixPlan"]

_GiB = 1 << 30
_EMA = 0.3  # weight of a new measurement in the running estimates


@dataclass
class RowPlan:
    """What one prompt row reuses: its real tokens, the chunk keys along its chain and how many tokens to load."""

    tokens: list[int]
    pad: int  # leading padding slots of the row
    keys: list[str]  # keys of every full chunk of the row's prompt (stored or not)
    cached: int  # how many leading chunks are stored
    load: int = 0  # tokens to load (a multiple of chunk_tokens, except when truncated to the batch's common length)


@dataclass
class PrefixPlan:
    """The prefix cache's plan for one generate() call, filled in as the call runs."""

    cache: PrefixCache
    model: torch.nn.Module
    root: str
    rows: list[RowPlan]
    common: int = 0  # slots of every row filled from the cache before the prefill (the cache's starting length)
    expand: int = 1
    loaded: list | None = None  # per layer (key, value) `[B, H, common, D]` to put into the generation cache
    captured: dict[int, list] = field(default_factory=dict)  # layer -> [(key, value)] of the prefill forwards
    capture_tokens: int = 0
    load_seconds: float = 0.0
    load_bytes: int = 0
    prefill_started: float | None = None
    prefill_seconds: float | None = None
    cache_object: object = None  # the generation cache the prefill wrote into


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """`(layers, key/value heads, head_dim)` of `model`'s cache, from its text config."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of K and V one token takes over all layers of `model` (what a chunk entry stores per token)."""
    layers, heads, head_dim = kv_shape(model)
    return 2 * layers * heads * head_dim * model.dtype.itemsize


def _entry_fits(entry, plan: PrefixPlan, index: int, tokens: int, layers: int) -> bool:
    """Whether a chunk entry is what this plan expects: its place in the chain and `[heads, >= tokens, head_dim]`
    float K and V for every layer of the model (an entry with a correct checksum but another shape is a miss)."""
    meta, tensors = entry.meta, entry.tensors
    if meta.get("root") != plan.root or meta.get("index") != index or meta.get("layers") != layers:
        return False
    if meta.get("chunk_tokens") != plan.cache.chunk_tokens or len(tensors) != 2 * layers:
        return False
    _, heads, head_dim = kv_shape(plan.model)
    for layer in range(layers):
        for name in ("k", "v"):
            t = tensors.get(f"{name}.{layer}")
            if t is None or t.dim() != 3 or not t.is_floating_point():
                return False
            if t.shape[0] != heads or t.shape[2] != head_dim or t.shape[1] < tokens:
                return False
    return True


class PrefixCache(StoreBackedCache):
    """A persistent K/V cache of prompt prefixes, used by `generate()` through `prefix_cache=` or [`attach`].

    Args:
        directory (`str` or `os.PathLike`): Folder of the disk tier (shared by processes).
        chunk_tokens (`int`, *optional*, defaults to 256): Tokens per chunk; only whole chunks are cached.
        namespace (`str`, *optional*): Separates tenants completely: entries of one namespace are never seen from
            another.
        disk_bytes (`int`, *optional*, defaults to 8 GiB): Bound of the disk tier.
        ram_bytes (`int`, *optional*, defaults to 1 GiB): Bound of the RAM tier (least-recently-used); 0 disables it.
        eviction_policy (`str`, *optional*, defaults to `"least-recently-used"`): Or `"least-frequently-used"`.
        cost_check (`bool`, *optional*, defaults to `True`): Load a hit only when predicted faster than recomputing.
        secret (`str` or `bytes`, *optional*): Key with which every entry is MACed and verified (HMAC-SHA256), for a
            folder writable by others; defaults to `HF_NEURALCACHE_SECRET`, unset: checksums only.
        remote (`str` or [`RedisTier`], *optional*): A shared tier on Redis behind the disk tier
            (`"redis://host:6379/0"`, `"rediss://..."`, `"unix:///path"`; credentials from the URL or
            `HF_NEURALCACHE_REDIS_USERNAME` / `HF_NEURALCACHE_REDIS_PASSWORD`): a local miss looks there, a hit fills
            the local tiers, writes go there in the background. A failing server costs a request at most about
            0.1 s, then is skipped for a while (see the "Sharing caches across machines" docs page).
        remote_bytes (`int`, *optional*): Bound of this cache's kind and namespace in Redis; `None` leaves it to the
            server's `maxmemory` policy.
        remote_dtype (`torch.dtype` or `str`, *optional*): Store the K/V in Redis in this floating-point dtype, e.g.
            `"bfloat16"` for an fp32 model: half the bytes to move, at a small error (measured in the docs page);
            `None` (default) keeps the model's dtype, exact.

    `stats()` counts `hits` (at most the prompt's last partial chunk recomputed), `partial_hits`, `misses`,
    `skipped_by_cost`, `tokens_reused`, `bytes_loaded`, `bytes_stored` and `seconds_saved` (estimated from the
    measured prefill speed), and the failures `storage_errors`, `integrity_errors` and `skipped` (never raised).

    Example:

    ```python
    >>> import tempfile
    >>> from hf_neuralcache import PrefixCache
    >>> cache = PrefixCache(tempfile.mkdtemp(), chunk_tokens=64)
    >>> cache.stats()["hits"]
    0
    ```
    """

    def __init__(
        self,
        directory,
        chunk_tokens: int = 256,
        namespace: str | None = None,
        disk_bytes: int = 8 * _GiB,
        ram_bytes: int = _GiB,
        eviction_policy: str = "least-recently-used",
        cost_check: bool = True,
        secret: str | bytes | None = None,
        remote=None,
        remote_bytes: int | None = None,
        remote_dtype: torch.dtype | str | None = None,
    ):
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
        if namespace is not None and not isinstance(namespace, str):
            raise ValueError(f"namespace must be a str or None, got {type(namespace).__name__}")
        given = remote_dtype
        if isinstance(remote_dtype, str):
            remote_dtype = getattr(torch, remote_dtype, given) if not remote_dtype.startswith("_") else given
        if remote_dtype is not None and not (isinstance(remote_dtype, torch.dtype) and remote_dtype.is_floating_point):
            raise ValueError(f"remote_dtype must be a floating-point torch dtype (e.g. 'bfloat16', 'float16') or None, "
                             f"got {given!r}")  # fmt: skip
        tier = remote_tier(remote, "prefix", namespace, max_bytes=remote_bytes)
        self.store = TieredStore(
            directory, "prefix", disk_bytes, ram_bytes, eviction_policy, secret, remote=tier, remote_dtype=remote_dtype
        )
        self.chunk_tokens = chunk_tokens
        self.namespace = namespace
        self.cost_check = cost_check
        self.counters = Counters(
            self.store,
            (
                "hits",
                "partial_hits",
                "misses",
                "skipped_by_cost",
                "tokens_reused",
                "bytes_loaded",
                "bytes_stored",
                "seconds_saved",
            ),
        )

    # ---- measurements -------------------------------------------------------------------------------------------
    def _measure(self, name: str, value: float) -> None:
        def update(record):
            old = record.get(name)
            record[name] = value if old is None else (1 - _EMA) * old + _EMA * value
            return record

        self.store.update_record("measurements", update)

    def estimates(self, model: torch.nn.Module) -> dict:
        """Measured prefill seconds per token of `model` on its device and bytes/s of each tier (`None`: unknown)."""
        record = self.store.read_record("measurements")
        return {
            "prefill_seconds_per_token": record.get(self._prefill_name(model)),
            "ram_bytes_per_second": record.get("ram_bytes_per_second"),
            "disk_bytes_per_second": record.get("disk_bytes_per_second"),
            "redis_bytes_per_second": record.get("redis_bytes_per_second"),
        }

    @staticmethod
    def _prefill_name(model) -> str:
        return f"prefill_seconds_per_token:{model_fingerprint(model)}:{model.device.type}"

    # ---- planning -----------------------------------------------------------------------------------------------
    def root(self, model: torch.nn.Module, regime: dict) -> str:
        return digest("prefix-root", model_fingerprint(model), regime, self.namespace or "")

    def plan(self, model: torch.nn.Module, regime: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Decide, for each row of `input_ids`, how many of its leading tokens to load instead of recomputing.

        A row can load at most its whole cached chunks and never its last token. With a cost estimate, each row
        loads the prefix length `n` maximizing `n * prefill_seconds_per_token - bytes(n) / tier_bytes_per_second`,
        or nothing when no length saves time; without estimates yet, the first hit is loaded and measured. The
        batch then starts from the shortest slot count every row can fill (rows are left-padded).
        """
        root = self.root(model, regime)
        self.store.fill_deferred()  # left by a call that raised before finish()
        self.store.use_model(model_fingerprint(model))
        ct = self.chunk_tokens
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.bool().tolist(), strict=True):
            pad = mask.index(True) if True in mask else len(mask)
            if not all(mask[pad:]):
                return None  # padding inside a row: not a left-padded prompt
            tokens = ids[pad:]
            keys, parent = [], root
            for start in range(0, len(tokens) - len(tokens) % ct, ct):
                parent = chain_key(parent, tokens[start : start + ct])
                keys.append(parent)
            cached = 0
            while cached < len(keys) and self.store.contains(keys[cached]):
                cached += 1
            rows.append(RowPlan(tokens, pad, keys, cached))
        plan = PrefixPlan(self, model, root, rows)
        estimates = self.estimates(model) if self.cost_check else {}
        per_token_bytes = kv_bytes_per_token(model)
        for row in rows:
            usable = min(row.cached * ct, len(row.tokens) - 1)
            row.load = self._worth_loading(row, usable, estimates, per_token_bytes)
        width = input_ids.shape[1]
        plan.common = min(row.pad + row.load if row.load else 0 for row in rows) if rows else 0
        plan.common = min(plan.common, width - 1)
        if plan.common <= max(row.pad for row in rows):
            plan.common = 0  # some row would load nothing: start every row from scratch
        for row in rows:
            row.load = max(plan.common - row.pad, 0)
        return plan

    def _worth_loading(self, row: RowPlan, usable: int, estimates: dict, per_token_bytes: int) -> int:
        if usable <= 0:
            return 0
        per_token = estimates.get("prefill_seconds_per_token")
        if per_token is None:
            return usable
        best, best_gain, seconds, ct = 0, 0.0, 0.0, self.chunk_tokens
        for index in range(-(-usable // ct)):
            tier = self.store.where(row.keys[index])
            rate = estimates.get(f"{tier}_bytes_per_second")
            tokens = min((index + 1) * ct, usable)
            seconds += 0.0 if rate is None else per_token_bytes * ct / rate
            gain = tokens * per_token - seconds
            if gain > best_gain:
                best, best_gain = tokens, gain
        if best < usable and best_gain <= 0:
            self.counters.add("skipped_by_cost", 1)
        return best

    # ---- loading ------------------------------------------------------------------------------------------------
    def load(self, plan: PrefixPlan, devices: list, dtype) -> None:
        """Read the planned chunks into `plan.loaded`: per layer `(key, value)` of shape `[B, H, common, D]`.

        Each chunk is copied straight into its slot of the output (on the layer's device); the time of each chunk's
        read and copy is what the tier's measured speed is made of.
        """
        if plan.common == 0:
            return
        ct, tiers, outs = self.chunk_tokens, {}, None
        start = time.perf_counter()
        for b, row in enumerate(plan.rows):
            for index in range(-(-row.load // ct)):
                begin = time.perf_counter()
                entry = self.store.get(row.keys[index], defer_fill=True)  # copied locally after the request
                tokens = min(ct, row.load - index * ct)
                if entry is None or not _entry_fits(entry, plan, index, tokens, len(devices)):
                    if entry is not None:  # a correct checksum but not this model's chunk: drop it
                        self.store.failed("integrity", "check", ValueError("chunk entry does not fit the model"))
                        self.store.delete(row.keys[index])
                    plan.common, plan.loaded = 0, None
                    for r in plan.rows:
                        r.load = 0
                    return
                if outs is None:
                    outs = self._allocate(entry.tensors, len(plan.rows), plan.common, devices, dtype)
                if index == 0 and row.pad:  # padding slots: never attended, but keep them finite
                    for kv in outs:
                        for out in kv:
                            out[b, :, : row.pad].zero_()
                at = row.pad + index * ct
                for layer, kv in enumerate(outs):
                    for out, name in zip(kv, ("k", "v"), strict=True):
                        source = entry.tensors[f"{name}.{layer}"][:, :tokens]
                        out[b, :, at : at + tokens].copy_(source, non_blocking=source.is_pinned())
                if devices[0].type == "cuda":
                    torch.cuda.synchronize(devices[0])
                done = tiers.setdefault(entry.tier, [0, 0.0])
                done[0] += entry.nbytes
                done[1] += time.perf_counter() - begin
                plan.load_bytes += entry.nbytes
        for tier, (nbytes, seconds) in tiers.items():
            self._measure(f"{tier}_bytes_per_second", nbytes / max(seconds, 1e-6))
        plan.loaded = outs
        plan.load_seconds = time.perf_counter() - start

    @staticmethod
    def _allocate(tensors: dict, batch: int, length: int, devices: list, dtype) -> list:
        outs = []
        for layer, device in enumerate(devices):
            kv = []
            for name in ("k", "v"):
                heads, _, dim = tensors[f"{name}.{layer}"].shape
                kv.append(torch.empty((batch, heads, length, dim), dtype=dtype, device=device))
            outs.append(tuple(kv))
        return outs

    # ---- storing ------------------------------------------------------------------------------------------------
    def finish(self, plan: PrefixPlan) -> None:
        """After generate: store the prompt's new whole chunks and update statistics and measurements."""
        self.store.fill_deferred()
        ct = self.chunk_tokens
        reused = sum(row.load for row in plan.rows)
        full = all(len(row.tokens) - row.load <= ct for row in plan.rows)
        if reused == 0:
            self.counters.add("misses", 1)
        elif full:
            self.counters.add("hits", 1)
        else:
            self.counters.add("partial_hits", 1)
        self.counters.add("tokens_reused", reused)
        self.counters.add("bytes_loaded", plan.load_bytes)
        computed = sum(len(row.tokens) - row.load for row in plan.rows)
        if plan.prefill_seconds is not None and computed > 0:
            per_token = plan.prefill_seconds / computed
            self._measure(self._prefill_name(plan.model), per_token)
            self.counters.add("seconds_saved", max(reused * per_token - plan.load_seconds, 0.0))
        if plan.captured:
            self._store_rows(plan)

    def _store_rows(self, plan: PrefixPlan) -> None:
        ct = self.chunk_tokens
        layers = sorted(plan.captured)
        if layers != list(range(len(layers))):
            return
        per_layer = []
        for layer in layers:
            keys = torch.cat([k for k, _ in plan.captured[layer]], dim=-2)[..., : plan.capture_tokens, :]
            values = torch.cat([v for _, v in plan.captured[layer]], dim=-2)[..., : plan.capture_tokens, :]
            per_layer.append((keys, values))
        for b, row in enumerate(plan.rows):
            todo = [i for i in range(len(row.keys)) if (i + 1) * ct > row.load and not self.store.contains(row.keys[i])]
            if not todo:
                continue
            src = b * plan.expand  # the first copy of the row after beam / num_return_sequences expansion
            skip = max(row.pad - plan.common, 0)  # captured slots of this row that are padding
            for index in todo:
                tensors = {}
                for layer, (keys, values) in enumerate(per_layer):
                    for name, full in (("k", keys), ("v", values)):
                        loaded = plan.loaded[layer][0 if name == "k" else 1][b, :, row.pad :] if row.load else None
                        real = full[src, :, skip:]
                        if loaded is not None:
                            real = torch.cat([loaded.to(real.device), real], dim=1)
                        tensors[f"{name}.{layer}"] = real[:, index * ct : (index + 1) * ct].contiguous().cpu()
                meta = {"chunk_tokens": ct, "index": index, "layers": len(per_layer), "root": plan.root}
                self.counters.add("bytes_stored", self.store.put(row.keys[index], tensors, meta))

    def __repr__(self):
        return f"PrefixCache({str(self.store.directory)!r}, chunk_tokens={self.chunk_tokens})"
