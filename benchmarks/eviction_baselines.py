"""Eviction baselines for the tensor_cache quality benchmark: TOVA, H2O and SnapKV as bounded KV caches.

Each keeps at most `budget` key/value entries per layer and KV head (default 260 = 4 sinks + 256), chosen from the
attention weights the model computes. The keys are stored as the model computed them, RoPE'd at their *original*
positions, and never re-rotated: a query at position `t` sees a kept key from position `i` with the relative
distance `t - i` it would see under full attention. The cache reports `get_seq_length()` = tokens seen (not
held), so the model numbers new tokens by their true position.

How it runs. `import eviction_baselines` registers the attention function `"eviction_baseline"` with
`transformers.AttentionInterface` (eager math, fp32 softmax; fine for a benchmark, slow for anything else). Use
it with `model.set_attn_implementation("eviction_baseline")` and pass an [`EvictionCache`]. For every layer, the
cache's `update` appends the chunk's keys and values to what the layer holds and returns all of them tagged with
the layer; the attention function computes softmax attention of the chunk's queries over them (causal within the
chunk; everything held precedes the chunk), hands the weights, averaged over the query heads of each KV group, to
the layer, and the layer evicts down to exactly `budget` entries per KV head before the next layer runs. So a
layer momentarily holds `budget + chunk` entries during a forward (`budget + 64` at 64-token chunks), and exactly
`budget` between forwards once the text is longer than the budget. Keys with no tag (any other cache, or none) get
the same attention with nothing recorded. No padding support: rows of a batch must be unpadded (transformers builds
no mask for an attention implementation without a mask function; this one builds its causal mask itself).

Policies (scores per KV head, the mean over its query heads; the first `sink_tokens` = 4 positions are always
kept by all three, and the rest of the budget goes by the policy):

* `"tova"` (TOVA, Oren et al. 2024, adapted to chunks): after each chunk, keep the entries with the highest
  attention from the chunk's queries, averaged over the queries that can see the entry (a key of the chunk is seen
  only by the queries at or after it; averaging over the visible ones does not penalise the newest keys). No state
  between chunks. `"tova_last"`: the original rule's score, the attention of the chunk's last query alone (which
  sees every entry).
* `"h2o"` (Heavy-Hitter Oracle, Zhang et al. 2023): every entry accumulates the attention it receives from every
  query while it is held (summed over queries; the mean over the group's heads); keep the `recent` most recent
  positions (default half the non-sink budget: 128 of 256) plus the entries with the largest accumulated score. The
  accumulated score is state held between chunks: one fp32 per entry, counted in `memory_bytes`.
* `"snapkv"` (SnapKV, Li et al. 2024, applied after every chunk instead of once after the prompt): the attention
  of an observation window of the chunk's last `observation` (32) queries, summed over them, max-pooled over
  neighbouring entries (kernel 7, stride 1; neighbours in position order among the held entries, which need not be
  adjacent positions), keep the top entries plus the observation window's own keys. No state between chunks.

Two options refine TOVA (`tensor_cache_quality.py`'s "carry" and "fitted layer budgets" rows):

* `carry` (0 <= carry < 1; TOVA only): an entry's score is this forward's TOVA score plus `carry` times its score
  after the previous forward, so an entry the last few chunks attended to is not dropped the first time a chunk
  ignores it. The score is state held between chunks: one fp32 per entry, counted in `memory_bytes`.
* per-layer budgets (`EvictionCache(budget=[...])`, one number per layer; [`layer_budgets`] spreads increments
  over a fixed mean): the layers that gain most from more entries get them, paid for by the others, within the
  same bytes. `fit_layer_budgets.py` measures the gains on the training text.

[`oracle_attention`] is not a cache: each query attends to its own top entries over every key (the sinks plus the
keys its KV group weights most). It bounds what any policy keeping that many entries, chosen by attention, can
reach.

`memory_bytes()` counts the keys and values (fp32 for an fp32 model), the position of each entry (int64, per KV
head: each head keeps other tokens) and H2O's accumulated scores (or TOVA's carried ones).

Retained tokens plus a memory (`EvictionCache(..., memory="moment")`, or fitted `TensorCacheParams`): every entry a
policy evicts is written, oldest first, into a fixed-size memory of the layer (`tensor_cache`'s training-free
`moment` estimator or its learned feature-map memory, the PyTorch references in `kernels/fast_weight/naive.py`);
the next forwards' queries read it and merge it with the held entries' softmax in one normaliser. The policy scores
the held entries by their softmax alone. `memory_bytes()` then also counts the memory's state.
"""

from __future__ import annotations

import weakref

import torch
from hf_neuralcache.kernels.fast_weight import naive
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = [
    "ATTENTION",
    "POLICIES",
    "EvictionCache",
    "EvictionLayer",
    "eviction_attention_forward",
    "layer_budgets",
    "oracle_attention",
]

ATTENTION = "eviction_baseline"
POLICIES = ("tova", "tova_last", "h2o", "snapkv")


class EvictionLayer(CacheLayerMixin):
    """One layer: up to `budget` entries per KV head (keys, values, original positions), evicted by `policy`.

    Args:
        policy (`str`): One of `POLICIES`.
        budget (`int`): Entries kept per KV head after each forward (sinks included).
        sink_tokens (`int`): First positions always kept.
        recent (`int`, *optional*): H2O's recent window; default half the non-sink budget.
        observation (`int`): SnapKV's observation window (last queries of the chunk).
        pool (`int`): SnapKV's max-pool kernel (odd).
        carry (`float`, *optional*, defaults to 0): TOVA only: add `carry` times an entry's previous score to
            this forward's (see the module docstring); 0 is the plain rule.
        memory (`str` or `LearnedMemory`, *optional*): Also write every evicted entry into a fixed-size memory that
            the queries read and merge with the held entries' softmax in one normaliser, as `tensor_cache` does for
            the entries that leave its window: `"moment"` (the training-free estimator) or the fitted parameters of
            one layer (`TensorCacheParams.layer(i)`, the `"learned"` mode). `None` (default): evicted entries are
            dropped.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, policy: str, budget: int, sink_tokens: int = 4, recent: int | None = None,
                 observation: int = 32, pool: int = 7, memory=None, carry: float = 0.0):  # fmt: skip
        super().__init__()
        if carry and policy not in ("tova", "tova_last"):
            raise ValueError(f"carry applies to the TOVA policies only, not {policy!r}")
        if not 0.0 <= carry < 1.0:
            raise ValueError(f"carry must be in [0, 1), got {carry}")
        self.carry = float(carry)
        if memory is not None and not (memory == "moment" or hasattr(memory, "k_weight")):
            raise ValueError(f"memory must be None, 'moment' or a LearnedMemory, got {memory!r}")
        self.memory, self.state = memory, None
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.head_budgets = None
        if not isinstance(budget, int):  # one budget per KV head
            self.head_budgets = torch.as_tensor([int(b) for b in budget], dtype=torch.long)
            budget = int(self.head_budgets.max())
            if policy not in ("tova", "tova_last"):
                raise ValueError(f"per-head budgets are for the TOVA policies, not {policy!r}")
            if memory is not None and memory != "moment":
                raise ValueError("per-head budgets take memory=None or 'moment'")
            if int(self.head_budgets.min()) < sink_tokens:
                got = self.head_budgets.tolist()
                raise ValueError(f"every head's budget must hold the {sink_tokens} sinks, got {got}")
        if recent is None:
            recent = (budget - sink_tokens) // 2
        if budget < sink_tokens + (recent if policy == "h2o" else 0) + (observation if policy == "snapkv" else 0):
            raise ValueError(f"budget {budget} is smaller than what {policy!r} always keeps")
        if pool % 2 != 1:
            raise ValueError(f"pool must be odd, got {pool}")
        self.policy, self.budget, self.sink_tokens = policy, budget, sink_tokens
        self.recent, self.observation, self.pool = recent, observation, pool
        self.seen = 0
        self.positions = self.accumulated = None
        self.chunk = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.keys, self.values = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=self.device)
        self.accumulated = torch.zeros(batch, heads, 0, dtype=torch.float32, device=self.device)
        if self.memory == "moment":
            self.state = naive.moment_state(batch, heads, key_states.shape[-1], value_states.shape[-1], "moment",
                                            device=self.device)  # fmt: skip
        elif self.memory is not None:
            features = 2 * self.memory.k_weight.shape[-1]
            self.state = naive.learned_state(batch, heads, features, value_states.shape[-1], device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the chunk; return every held entry plus the chunk, the keys tagged with this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q, _ = key_states.shape
        new = torch.arange(self.seen, self.seen + q, device=self.device).expand(batch, heads, q)
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        self.positions = torch.cat([self.positions, new], -1)
        self.accumulated = torch.cat([self.accumulated, self.accumulated.new_zeros(batch, heads, q)], -1)
        self.seen += q
        self.chunk = q
        keys = self.keys.view(self.keys.shape)  # a fresh tensor object to carry the tag
        keys._eviction_layer = weakref.ref(self)
        return keys, self.values

    # ---- eviction -------------------------------------------------------------------------------------------------
    def observe(self, weights: torch.Tensor) -> None:
        """`weights` `[B, Hkv, q, K]`: this forward's attention (mean over each group's query heads); evict."""
        held, q = weights.shape[-1], weights.shape[-2]
        if self.policy == "h2o":
            self.accumulated = self.accumulated + weights.sum(-2)
        if self.carry:  # TOVA with carry: this forward's score plus `carry` times the entry's previous score
            self.accumulated = self._tova_score(weights) + self.carry * self.accumulated
        valid = self.positions >= 0  # per-head budgets pad the heads that hold fewer (position -1)
        if self.head_budgets is None and held <= self.budget:
            return
        if self.head_budgets is not None and bool((valid.sum(-1) <= self.head_budgets).all()):
            return
        forced = self.positions < self.sink_tokens
        if self.carry:
            score = self.accumulated
        elif self.policy in ("tova", "tova_last"):
            score = self._tova_score(weights)
        elif self.policy == "h2o":
            score = self.accumulated
            forced = forced | (self.positions >= self.seen - self.recent)
        else:  # snapkv
            window = min(self.observation, q)
            score = weights[:, :, -window:].sum(-2)
            batch, heads = score.shape[:2]
            score = torch.nn.functional.max_pool1d(
                score.reshape(batch * heads, 1, held), self.pool, stride=1, padding=self.pool // 2
            ).reshape(batch, heads, held)
            forced = forced | (self.positions >= self.seen - window)
        score = score.float().masked_fill(forced & valid, float("inf"))
        if self.head_budgets is None:
            keep = score.topk(self.budget, dim=-1).indices.sort(-1).values  # [B, Hkv, budget], position order
            self.keep(keep)
            return
        # per-head budgets: head h keeps its top `head_budgets[h]`; the tensors hold max(budgets) entries a head, the
        # rest padding (position -1, never attended, not counted in memory_bytes)
        score = score.masked_fill(~valid, float("-inf"))
        top = score.topk(min(self.budget, held), dim=-1)
        rank = torch.arange(top.indices.shape[-1], device=score.device)
        ok = (rank < self.head_budgets.to(score.device).view(1, -1, 1)) & (top.values > float("-inf"))
        index = torch.where(ok, top.indices, held + rank)  # padding sorts last
        index, order = index.sort(-1)
        ok = ok.gather(-1, order)
        self.keep(index.clamp(max=held - 1), ok)

    def _tova_score(self, weights: torch.Tensor) -> torch.Tensor:
        held, q = weights.shape[-1], weights.shape[-2]
        if self.policy == "tova_last":
            return weights[:, :, -1].float()
        old = held - q
        seen_by = (q - (torch.arange(held, device=weights.device) - old).clamp(min=0)).clamp(min=1)
        return weights.float().sum(-2) / seen_by

    def keep(self, index: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Keep the entries at `index` (`[B, Hkv, n]`, ascending) of every per-entry tensor; the rest go to memory.

        `ok` (`[B, Hkv, n]` bool, per-head budgets): which of them are kept; the others become padding.
        """
        gather = lambda t, i=index: t.gather(2, i.unsqueeze(-1).expand(*i.shape, t.shape[-1]))  # noqa: E731
        if ok is not None:
            kept = torch.zeros(self.positions.shape, dtype=torch.bool, device=self.device)
            kept.scatter_(2, index, ok)
            dropped = (self.positions >= 0) & ~kept
            if self.state is not None:
                self._write_per_head(dropped)
            self.keys, self.values = gather(self.keys), gather(self.values)
            self.positions = self.positions.gather(2, index).masked_fill(~ok, -1)
            self.accumulated = self.accumulated.gather(2, index).masked_fill(~ok, 0.0)
            return
        if self.state is not None:
            dropped = torch.ones(self.positions.shape, dtype=torch.bool, device=self.device)
            dropped.scatter_(2, index, False)
            batch, heads, held = dropped.shape
            # the same count leaves every head; in position order (oldest first), as tensor_cache writes them
            gone = torch.arange(held, device=self.device).expand(batch, heads, held)[dropped].view(batch, heads, -1)
            keys, values = gather(self.keys, gone), gather(self.values, gone)
            weights = keys.new_ones(batch, keys.shape[2], dtype=torch.float32)
            if self.memory == "moment":
                self.state = naive.moment_write(self.state, keys, values, weights, keys.new_zeros(heads))
            else:
                self.state = naive.learned_write(self.state, keys, values, weights, self.memory)
        self.keys, self.values = gather(self.keys), gather(self.values)
        self.positions = self.positions.gather(2, index)
        self.accumulated = self.accumulated.gather(2, index)

    def _write_per_head(self, dropped: torch.Tensor) -> None:
        """Write each head's `dropped` entries (`[B, Hkv, held]` bool; batch 1), oldest first, into its memory."""
        if dropped.shape[0] != 1:
            raise ValueError("per-head budgets with a memory support one sequence (batch 1)")
        fields = [None if t is None else list(t.unbind(1)) for t in self.state]
        for head in range(dropped.shape[1]):
            gone = dropped[0, head].nonzero().squeeze(-1)
            if gone.numel() == 0:
                continue
            keys, values = self.keys[:, head : head + 1, gone], self.values[:, head : head + 1, gone]
            state = type(self.state)(*(None if t is None else t[:, head : head + 1] for t in self.state))
            weights = keys.new_ones(1, gone.numel(), dtype=torch.float32)
            state = naive.moment_write(state, keys, values, weights, keys.new_zeros(1))
            for field, tensor in zip(fields, state, strict=True):
                if field is not None:
                    field[head] = tensor[:, 0]
        self.state = type(self.state)(*(None if f is None else torch.stack(f, 1) for f in fields))

    def read_memory(self, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scaling: float) -> torch.Tensor:
        """Merge the memory's read (`query` `[B, Hq, q, D]`) into the held entries' `out` `[B, Hq, q, Dv]`, `lse`."""
        batch, heads = self.state[0].shape[:2]
        # no pairs of this chunk: the memory holds only what earlier forwards evicted
        keys, values = self.keys[:, :, :0], self.values[:, :, :0]
        nothing, prefix = query.new_zeros(batch, 0), torch.zeros(query.shape[2], dtype=torch.long, device=query.device)
        if self.memory == "moment":
            out_m, lse_m = naive.moment_read(self.state, query, keys, values, nothing, prefix,
                                             query.new_zeros(heads), scaling)  # fmt: skip
        else:
            out_m, log_mass = naive.learned_read(self.state, query, keys, values, nothing, prefix, self.memory)
            lse_m = lse + log_mass
        return naive.merge_softmax(out, lse, out_m, lse_m)[0]

    # ---- sizes ----------------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen  # tokens seen: the model numbers the next token by its true position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = 0 if self.keys is None else self.keys.shape[-2]
        return held + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        if self.head_budgets is not None:  # the entries held, as a ragged (per-head) layout would store them
            entries = int((self.positions >= 0).sum())
            per = (self.keys[0, 0, 0].numel() + self.values[0, 0, 0].numel()) * self.keys.element_size() + 8
            per += 4 if self.carry else 0
            return entries * per + sum(t.numel() * t.element_size() for t in (self.state or ()) if t is not None)
        scored = self.policy == "h2o" or self.carry  # a score per entry held between forwards
        tensors = [self.keys, self.values, self.positions] + ([self.accumulated] if scored else [])
        tensors += [t for t in (self.state or ()) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.accumulated = self.state = None
        self.seen, self.is_initialized = 0, False


class EvictionCache(Cache):
    """A cache of [`EvictionLayer`]s, one per decoder layer (run with `attn_implementation="eviction_baseline"`).

    Args:
        config (`PreTrainedConfig`): The model's config.
        policy (`str`): `"tova"`, `"tova_last"`, `"h2o"` or `"snapkv"`.
        budget (`int` or `list`, *optional*, defaults to 260): Entries per KV head (4 sinks + 256), the same for
            every layer; or one item per layer (see [`layer_budgets`]): an `int`, or a list with one budget per KV
            head (TOVA policies; the heads that hold fewer are padded, and `memory_bytes` counts the entries held).
        memory (`str` or `TensorCacheParams`, *optional*): `"moment"`, or fitted params (each layer gets its own
            `params.layer(i)`): write the evicted entries into a memory (see [`EvictionLayer`]).
        **options: `sink_tokens`, `recent`, `observation`, `pool`, `carry` (see [`EvictionLayer`]).
    """

    def __init__(self, config, policy: str, budget: int = 260, memory=None, **options):
        layers = config.get_text_config().num_hidden_layers
        if isinstance(budget, int):
            budgets = [budget] * layers
        else:  # one per layer: an int, or one per KV head
            budgets = [b if isinstance(b, int) else list(b) for b in budget]
        if len(budgets) != layers:
            raise ValueError(f"budget has {len(budgets)} entries, expected one per layer ({layers})")
        per_layer = [memory if memory in (None, "moment") else memory.layer(i) for i in range(layers)]
        pairs = zip(budgets, per_layer, strict=True)
        super().__init__(layers=[EvictionLayer(policy, b, memory=m, **options) for b, m in pairs])
        self.policy, self.budget = policy, budget

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    def held(self) -> list[int]:
        """Entries each layer holds per KV head now (the most any of its heads holds, with per-head budgets)."""
        return [0 if layer.keys is None else int((layer.positions >= 0).sum(-1).max()) for layer in self.layers]


def _causal_scores(query: torch.Tensor, key: torch.Tensor, scaling: float | None, softcap: float | None):
    """fp32 scores `[B, Hkv, G, q, K]` of each KV group's queries, `-inf` where a query may not look: the chunk is
    the last `q` keys (everything before it precedes every query), causal within it."""
    batch, hq, q, dim = query.shape
    hkv, held = key.shape[1], key.shape[2]
    scaling = dim**-0.5 if scaling is None else scaling
    grouped = query.float().reshape(batch, hkv, hq // hkv, q, dim)
    scores = grouped @ key.float().unsqueeze(2).transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    old = held - q  # entries from earlier forwards precede the chunk: query i sees them and chunk keys <= i
    visible = torch.arange(held, device=key.device) <= old + torch.arange(q, device=key.device).unsqueeze(-1)
    return scores.masked_fill(~visible, float("-inf"))


def eviction_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Softmax attention over an [`EvictionLayer`]'s entries plus the chunk; passes the weights to the layer.

    Same contract as transformers' attention functions: `query` `[B, Hq, q, D]`, `key`/`value` `[B, Hkv, K, D]`;
    returns `([B, q, Hq, Dv], None)`. The mask is built here (causal, the chunk being the last `q` keys): transformers
    builds none for an attention implementation without a registered mask function, so `attention_mask` is `None`
    and padding is not supported. Untagged keys (another cache, or none) get the same attention, nothing recorded.
    """
    batch, hq, q, _ = query.shape
    scores = _causal_scores(query, key, scaling, kwargs.get("softcap"))
    ref = getattr(key, "_eviction_layer", None)
    layer = None if ref is None else ref()
    if layer is not None and layer.head_budgets is not None:  # padding of the heads that hold fewer entries
        scores = scores.masked_fill((layer.positions < 0)[:, :, None, None, :], float("-inf"))
    weights = scores.softmax(-1)
    out = weights @ value.float().unsqueeze(2)  # [B, Hkv, G, q, Dv]
    out = out.reshape(batch, hq, q, -1)
    if layer is not None and layer.state is not None:  # the memory holds what was evicted before this forward
        out = layer.read_memory(query, out, scores.logsumexp(-1).reshape(batch, hq, q), scaling)
    if layer is not None:
        layer.observe(weights.mean(2))
    out = out.transpose(1, 2).contiguous().to(query.dtype)
    return out, None


AttentionInterface.register(ATTENTION, eviction_attention_forward)


def layer_budgets(increments: list[int], mean: int, one_head: dict[int, int] | None = None, heads: int = 1) -> list:
    """Per-layer budgets averaging `mean` entries per KV head: layer `i` gets `increments[i]` more than the layers
    with no increment, which share what is left equally (the first of them one more each while a remainder is left).

    `one_head` (`{layer: head}`, with `heads` KV heads): those layers give all their extra entries (`heads x
    increment`) to one KV head, the others keeping the layer's base; their item is then a list per head.

    Raises:
        `ValueError`: if the layers with no increment would get fewer than 1 entry, or every layer has one.
    """
    total = mean * len(increments)
    rest = [i for i, extra in enumerate(increments) if extra == 0]
    if not rest:
        raise ValueError("at least one layer must have no increment (it pays for the others)")
    left = total - sum(mean + extra for extra in increments if extra)
    base, remainder = divmod(left, len(rest))
    if base < 1:
        raise ValueError(f"increments {increments} leave the other layers {left} entries in all")
    budgets = [mean + extra for extra in increments]
    for j, i in enumerate(rest):
        budgets[i] = base + (1 if j < remainder else 0)
    for layer, head in (one_head or {}).items():
        extra = increments[layer]
        budgets[layer] = [mean + (heads * extra if h == head else 0) for h in range(heads)]
    return budgets


def oracle_attention(entries: int, sink_tokens: int = 4, window: int = 0) -> str:
    """Register (once) and name an attention function that lets each query see only `entries` keys: the sinks and
    the keys with the highest attention weight from *that query* (the mean over its KV group's query heads), over
    the full KV cache. Not a cache (each query chooses with knowledge no bounded cache has, its own scores over
    every past key): a bound on what any policy that keeps `entries` keys per KV head, chosen by the group's
    attention, can reach. Run it with a `DynamicCache`. With `window`, each query also always sees its last `window`
    positions (itself included), and chooses only the rest: a bound on any cache that keeps a window of that size and
    adds `entries - sink_tokens - window` entries' worth of whatever it keeps of the tokens that left it.
    """
    name = f"eviction_oracle_{entries}_{sink_tokens}" + (f"_w{window}" if window else "")

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, hq, q, _ = query.shape
        held = key.shape[2]
        scores = _causal_scores(query, key, scaling, kwargs.get("softcap"))
        if held > entries:
            group = scores.softmax(-1).mean(2, keepdim=True)  # the KV group's weights
            sinks = torch.arange(held, device=key.device) < sink_tokens
            group = group.masked_fill(sinks, 2.0)  # above any weight: always among the top
            if window:  # each query's own last `window` positions are always seen too
                where = torch.arange(held, device=key.device)
                last = torch.arange(held - q, held, device=key.device).unsqueeze(-1)  # each query's position
                recent = (where > last - window) & (where <= last)
                group = group.masked_fill(recent.view(1, 1, 1, q, held), 2.0)
            threshold = group.topk(entries, dim=-1).values[..., -1:]
            scores = scores.masked_fill(group < threshold, float("-inf"))
        out = (scores.softmax(-1) @ value.float().unsqueeze(2)).reshape(batch, hq, q, -1)
        return out.transpose(1, 2).contiguous().to(query.dtype), None

    AttentionInterface.register(name, forward)  # registering the same name again replaces an equal function
    return name
