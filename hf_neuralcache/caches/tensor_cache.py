"""`tensor_cache`: an exact window (L1) plus a fixed-size memory (L2) of the tokens that left it (Tensor Cache).

Per layer and KV head the cache holds

    | sinks | ring: the last `window` tokens |   +   memory: a fixed-size summary of every evicted token

The window is a [`SinkWindowLayer`] (composed, not inherited). Every key/value pair that leaves the ring (sinks and
padding excepted) is written into the memory, whose size does not depend on the sequence length. The memory
changes the attention output, which transformers computes in its attention function: `update` returns the
window's keys tagged with this layer, and whatever attention implementation the model was loaded with
(`"sdpa"`, `"eager"`, `"flex_attention"` or `"neuralcache"`), `hf_neuralcache.registry` routes the call for those keys
to [`TensorCacheLayer.attention`], which reads the memory and merges it with the window. `"neuralcache"` adds the
fused Triton kernels on CUDA.

Three modes (`cache_config["mode"]`):

* `"training_free"` (default), for pretrained models that never saw a memory: the memory keeps decayed moments of
  the evicted pairs and returns an estimate of their softmax terms (a value and a log-denominator), merged with the
  window through one log-sum-exp. Query `t` sees the window `(t - window, t]`, the sinks and, in the memory,
  every other earlier token: with an exact memory this would be full attention.
* `"learned"`, a memory fitted on the frozen model (`fit_tensor_cache`, [`TensorCacheParams`]): per KV head a
  linear-attention state `sum_i lam^(t-i) eta phi(k_i) v_i^T` and normaliser `sum_i lam^(t-i) eta phi(k_i)` with a
  learned feature map `phi`, merged with the window's softmax in one normaliser; the same visibility as
  `"training_free"`.
* `"paper"`, the published equations for models trained with them: fast weights `A` written
  `A <- lam A + eta k_hat^T u` (outer or delta rule) *after* the query has read `r = q A`, fused as
  `attn + sigmoid(g) * tc_proj(r)` per head before `o_proj` (see `docs/tensor_cache.md` for this one deviation).

Rollback: while past recording is on, every forward that evicts keeps a journal entry (a copy of the memory state
before it, plus its evicted pairs), so `crop` restores the state and replays the pairs that
stay: exact, at the cost of one memory state and the evicted pairs per recorded forward, bounded by
`max_rollback` tokens.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import CacheLayerMixin

from ..kernels.fast_weight import (
    fast_weight_read,
    fast_weight_write,
    learned_features,
    learned_read,
    learned_state,
    learned_write_features,
    merge_softmax,
    moment_read,
    moment_state,
    moment_write,
    window_attention_lse,
)
from .base import AttentionState, BatchOps, NeuralCache, Option, Step, check_options, check_sinks_fit, compiling
from .retention import RetainedTokens
from .retention_fit import RetentionParams
from .sliding_window import SinkWindowLayer
from .tensor_cache_params import TensorCacheParams

__all__ = ["TensorCache", "TensorCacheLayer"]

MEMORIES = ("mean", "moment", "gaussian")
MODES = ("training_free", "learned", "paper")


class TensorCacheLayer(BatchOps, CacheLayerMixin):
    """One layer of [`TensorCache`]: a sinks-plus-window ring and a fixed-size memory of the evicted pairs.

    Args:
        window (`int`): Most recent positions a query sees exactly, its own included.
        sink_tokens (`int`): First real tokens of each sequence that stay visible (never written to the memory).
        mode (`str`, *optional*, defaults to `"training_free"`): `"training_free"`, `"learned"` or `"paper"`.
        memory (`str`, *optional*, defaults to `"moment"`): Training-free estimator, one of `"mean"`, `"moment"`,
            `"gaussian"` (see `kernels/fast_weight/naive.py`).
        rule (`str`, *optional*, defaults to `"delta"`): Paper write rule, `"delta"` or `"outer"`.
        decay (`float` or `torch.Tensor` of shape `[Hkv]`, *optional*, defaults to 1.0): `lam`, per write.
        write_rate (`float` or `torch.Tensor` of shape `[Hkv]`, *optional*, defaults to 0.05): Paper `eta`.
        gate (`float`, *optional*, defaults to -2.0): Paper gate logit `g`.
        tc_proj (`torch.Tensor` of shape `[Hq * Dv, Hq * Dv]`, *optional*): Paper read projection; identity if `None`.
        max_rollback (`int`, *optional*, defaults to 256): Tokens one `crop` can remove while recording the past.
        learned (`LearnedMemory`, *optional*): The fitted parameters of the `"learned"` mode.
        retain (`int`, *optional*, defaults to 0): Pairs that left the window kept exactly per KV head, chosen by
            attention ([`RetainedTokens`]); the others go to the memory. 0: every pair that leaves goes to the memory.
        carry (`float`, *optional*, defaults to 0.0): With `retain`, the share of a retained pair's previous score
            kept after `carry_span` queries.
        carry_span (`int`, *optional*, defaults to 64): The queries `carry` is given for ([`RetainedTokens`]).
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False
    owns_attention = True  # the memory changes the attention output: attention calls [`attention`], always

    def __init__(
        self,
        window: int,
        sink_tokens: int,
        mode: str = "training_free",
        memory: str = "moment",
        rule: str = "delta",
        decay: float | torch.Tensor = 1.0,
        write_rate: float | torch.Tensor = 0.05,
        gate: float = -2.0,
        tc_proj: torch.Tensor | None = None,
        max_rollback: int = 256,
        learned=None,
        retain: int = 0,
        carry: float = 0.0,
        retention: torch.Tensor | None = None,
        carry_span: int = 64,
    ):
        super().__init__()
        self.learned = learned
        self.pool = RetainedTokens(retain, carry, retention, carry_span) if retain else None
        self.ring = SinkWindowLayer(window, sink_tokens, max_rollback=max_rollback)
        self.window, self.sink_tokens, self.max_rollback = window, sink_tokens, max_rollback
        self.mode, self.memory, self.rule = mode, memory, rule
        self.decay, self.write_rate, self.gate, self.tc_proj = decay, write_rate, float(gate), tc_proj
        self.state = None  # MomentState (training_free), LearnedState (learned) or A [B, Hkv, D, Dv] (paper), float32
        self.record_past = False
        # (first evicted position, state before, keys, values, weights, retained-token record or None)
        self.journal: list[tuple] = []
        self._pending = None  # what attention reads: (state before, keys, values, weights, first, write deferred)

    @property
    def policy(self) -> tuple[int, int]:
        return self.ring.policy

    def layout(self, step: Step, batch_size: int, device: torch.device):
        return self.ring.layout(step, batch_size, device)

    @property
    def length(self) -> torch.Tensor | None:
        """0-d long tensor: tokens written so far (the window's)."""
        return self.ring.length

    # ---- state ----------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        value_dim, device = value_states.shape[-1], key_states.device
        self.dtype, self.device = key_states.dtype, device
        self.ring.lazy_initialization(key_states, value_states)
        as_heads = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device).expand(heads).clone()  # noqa: E731
        self.decay_t, self.write_rate_t = as_heads(self.decay), as_heads(self.write_rate)  # [Hkv]
        self.log_decay = torch.log(self.decay_t)
        if self.mode == "paper":
            self.state = torch.zeros(batch, heads, head_dim, value_dim, dtype=torch.float32, device=device)
        elif self.mode == "learned":
            self.learned = type(self.learned)(*(t.to(device) for t in self.learned))
            features = self.learned.k_weight.shape[-1] * 2
            self.state = learned_state(batch, heads, features, value_dim, device)
        else:
            self.state = moment_state(batch, heads, head_dim, value_dim, self.memory, device)
        if self.pool is not None:
            self.pool.init(key_states, value_states)
        self._mark_static()
        self.is_initialized = True

    def _mark_static(self) -> None:
        """The decode step writes the memory in place: fixed addresses, as for the window (CUDA graphs)."""
        if not compiling():
            for tensor in _tensors(self.state) + (self.pool.tensors() if self.pool is not None else []):
                torch._dynamo.mark_static_address(tensor)

    def _advance(self, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor):
        """Write the evicted pairs into the memory, in place; returns a copy of the memory from before."""
        before = _map(self.state, torch.clone)
        self._set_state(self._write(before, keys, values, weights))
        return before

    def _set_state(self, state) -> None:
        for target, source in zip(_tensors(self.state), _tensors(state), strict=True):
            target.copy_(source)

    def _write(self, state, keys, values, weights):
        if self.mode == "paper":
            return fast_weight_write(state, keys, values, weights, self.decay_t, self.write_rate_t, self.rule)
        if self.mode == "learned":  # the chunked Triton write when Triton runs, else the reference
            memory = self.learned
            fk = learned_features(keys, memory.k_weight, memory.k_bias)
            return learned_write_features(state, fk, values, weights, memory.log_decay, memory.write_rate)
        return moment_write(state, keys, values, weights, self.log_decay)

    def _evicted(self, start: int, stop: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Keys and values `[B, H, stop - start, D]` at positions `start .. stop - 1`, read before the ring write."""
        seen, ring = self.ring.seen, self.ring
        old = torch.arange(start, min(stop, seen), device=key_states.device)
        keys = [ring.keys.index_select(2, ring.sink_tokens + old % self.window)] if old.numel() else []
        values = [ring.values.index_select(2, ring.sink_tokens + old % self.window)] if old.numel() else []
        if stop > seen:  # new tokens that pass straight through the ring
            keys.append(key_states[:, :, max(0, start - seen) : stop - seen])
            values.append(value_states[:, :, max(0, start - seen) : stop - seen])
        return torch.cat(keys, 2), torch.cat(values, 2)

    def _weights(self, start: int, stop: int, step: Step, batch: int, device) -> torch.Tensor:
        """`[B, m]` float: 1 for a real token that is not a sink, 0 otherwise."""
        positions = torch.arange(start, stop, device=device).expand(batch, -1)
        sink = (positions.unsqueeze(-1) == self.ring.sink_slots.unsqueeze(1)).any(-1)
        return (step.real(positions).to(device) & ~sink).float()

    # ---- writing and reading --------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step | None = None, **kwargs):
        """Write `key_states`/`value_states` (`[B, H, q, D]`); evicted pairs go to the memory (read first)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if step is None:
            step = Step(self.ring.length.clone() if q == 1 else self.ring.seen, q, -1, None)
        if q == 1 and not (self.record_past and self.max_rollback):
            return self._update_one(key_states, value_states, step)
        seen = self.ring.seen
        start, stop = max(0, seen - self.window), max(0, seen + q - self.window)
        if stop > start:
            ev_k, ev_v = self._evicted(start, stop, key_states, value_states)
        else:
            ev_k, ev_v = key_states[:, :, :0], value_states[:, :, :0]
        keys, values = self.ring.update(key_states, value_states, step=step)
        weights = self._weights(start, stop, step, key_states.shape[0], key_states.device)
        before = self.state
        if stop > start and self.pool is None:  # with retained tokens the write waits for attention's choice
            before = self._advance(ev_k, ev_v, weights)
            if self.record_past and self.max_rollback:
                self._journal_add(start, before, ev_k, ev_v, weights)
        self._pending = (before, ev_k, ev_v, weights, start, False)
        keys._neuralcache_state = AttentionState(weakref.ref(self), keys._neuralcache_state.layout, step)
        return keys, values

    def _update_one(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step):
        """The decode step with tensor ops only: the pair in the ring entry the new token takes leaves the window.

        Before the window is full that entry is empty (weight 0) and the memory is still all zeros, so writing and
        reading a zero-weight pair changes nothing: no branch on the position is needed.
        """
        ring, sinks = self.ring, self.sink_tokens
        leaving = ring.length - self.window  # the position leaving (negative: none yet); before `length` advances
        entry = (sinks + ring.length % self.window).view(1)
        ev_k, ev_v = ring.keys.index_select(2, entry), ring.values.index_select(2, entry)  # [B, H, 1, D]
        held = ring.slots.index_select(1, entry)  # [B, 1]: the position leaving, -1 if none or padding
        weights = ((held >= 0) & ~(held == ring.slots[:, :sinks]).any(-1, keepdim=True)).float()  # sinks stay
        keys, values = ring.update(key_states, value_states, step=step)
        if self.pool is not None:  # attention chooses what the memory gets, then writes it
            self._pending = (self.state, ev_k, ev_v, weights, leaving, False)
        elif self._fused_decode(key_states):  # the attention step's one kernel writes the memory, in place
            self._pending = (self.state, ev_k, ev_v, weights, leaving, True)
        else:
            self._pending = (self._advance(ev_k, ev_v, weights), ev_k, ev_v, weights, leaving, False)
        keys._neuralcache_state = AttentionState(weakref.ref(self), keys._neuralcache_state.layout, step)
        return keys, values

    def _fused_decode(self, tensor: torch.Tensor) -> bool:
        """Whether a decode step runs as one kernel: window + read + merge + the write of the leaving pair."""
        from ..kernels.dispatch import use_triton

        fused = self.mode == "learned" or (self.mode == "training_free" and self.memory != "gaussian")
        return fused and use_triton(tensor)

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        state: AttentionState,
        scaling: float,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Window softmax merged with the memory, for the keys `update` just returned. Returns `[B, Hq, q, Dv]`.

        Called once per forward by the attention function (any implementation: `hf_neuralcache.registry` routes the
        call here). A mask overlay (only ever on a forward of several tokens, never a fused decode step) takes the
        dense-mask path.
        """
        if self._pending is None:
            raise RuntimeError("TensorCacheLayer.attention must follow update() of the same forward, once.")
        before, ev_k, ev_v, weights, first, deferred = self._pending
        self._pending = None
        if self.pool is None:
            pairs = (before, ev_k, ev_v, weights, first, deferred)
            return self._attend(query, key, value, state, scaling, softcap, *pairs)[0].to(query.dtype)
        # retained tokens: the memory as it was before this forward, merged with the window and, exactly, the pool and
        # the pairs leaving the window now (each for the queries it is outside the window of); then they compete
        nothing = (before, ev_k[:, :, :0], ev_v[:, :, :0], weights[:, :0], first, False)
        out, lse = self._attend(query, key, value, state, scaling, softcap, *nothing)
        positions = torch.arange(ev_k.shape[2], device=query.device) + first  # `first`: a 0-d tensor when compiled
        q_pos = state.step.q_slots.to(query.device)
        cand = self.pool.attend(query, scaling, softcap, ev_k, ev_v, positions, weights, q_pos, self.window)
        out, lse = merge_softmax(out, lse, cand[0], cand[1])
        if ev_k.shape[2]:
            self._retain(cand[2], cand[3], lse, state.step, q_pos, before, ev_k, ev_v, weights, positions, first)
        return out.to(query.dtype)

    def _attend(self, query, key, value, state, scaling, softcap, before, ev_k, ev_v, weights, first, deferred):
        """`(out, lse)` float32 of the window merged with the memory; `lse` is `None` in `"paper"` mode."""
        from ..kernels.dispatch import use_triton  # here, to keep this cache's imports as they are
        from ..kernels.fast_weight import (
            fast_weight_decode,
            learned_decode,
            learned_prefill,
            moment_decode,
            moment_prefill,
        )
        from ..kernels.window_attention import attend

        layout = state.layout
        q_pos = state.step.q_slots.to(query.device)
        # training_free: query t sees every evicted position <= t - window; paper: reads before t - window is written
        shift = -1 if self.mode == "paper" else 0
        prefix = (q_pos - self.window + 1 - first + shift).clamp(0, ev_k.shape[-2])
        # CUDA (or TRITON_INTERPRET=1): kernels over the layout, no dense mask; a model's mask overlay needs `visible`
        kernel = use_triton(query) and not layout.overlaid
        window = (query, key, value, layout.slots, layout.valid, layout.sink, layout.q_slots, layout.window, scaling)
        pairs = (before, ev_k, ev_v, weights)
        if kernel and self.mode == "training_free" and self.memory != "gaussian":
            if deferred:  # decode: one kernel for window + write of the leaving pair + read + merge, in place
                out, lse, _ = moment_decode(*window, *pairs, self.log_decay, softcap, out=self.state)
            elif query.shape[2] == 1:  # decode after update() wrote the pair (recording the past): prefix == m
                out, lse, _ = moment_decode(*window, *pairs, self.log_decay, softcap)
            else:
                out, lse = moment_prefill(*window, *pairs, prefix, self.log_decay, softcap)
            return out, lse
        if kernel and self.mode == "learned":  # the same three kernels, fed the feature map's outputs
            memory = self.learned
            fq = learned_features(query, memory.q_weight, memory.q_bias)  # [B, Hq, q, 2F]
            fk = learned_features(ev_k, memory.k_weight, memory.k_bias)  # [B, Hkv, m, 2F]
            pairs, rates = (before, fq, fk, ev_v, weights), (memory.log_decay, memory.write_rate)
            if deferred:  # decode: one kernel for window + write of the leaving pair + read + merge, in place
                out, lse, _ = learned_decode(*window, *pairs, *rates, softcap, out=self.state)
            elif query.shape[2] == 1:  # decode after update() wrote the pair (recording the past): prefix == m
                out, lse, _ = learned_decode(*window, *pairs, *rates, softcap)
            else:
                out, lse = learned_prefill(*window, *pairs, prefix, *rates, softcap)
            return out, lse
        if self.mode == "learned":  # window softmax merged with the memory, its mass in units of the window's
            out, lse = window_attention_lse(query, key, value, layout.visible.to(query.device), scaling, softcap)
            mem, log_mass = learned_read(before, query, ev_k, ev_v, weights, prefix, self.learned)
            return merge_softmax(out, lse, mem, lse + log_mass)
        if kernel and self.mode == "paper" and query.shape[2] == 1:  # decode reads A before this step's pair
            rates = (self.decay_t, self.write_rate_t, self.rule)
            out, r, _ = fast_weight_decode(*window, *pairs, *rates, softcap)  # one kernel: window + read
        else:
            if kernel:
                out, lse = attend(*window, softcap, return_lse=True)
            else:
                visible = layout.visible.to(query.device)
                out, lse = window_attention_lse(query, key, value, visible, scaling, softcap)
            if self.mode == "training_free":
                mem, mem_lse = moment_read(before, query, ev_k, ev_v, weights, prefix, self.log_decay, scaling)
                return merge_softmax(out, lse, mem, mem_lse)
            r = fast_weight_read(
                before, query, ev_k, ev_v, weights, prefix, self.decay_t, self.write_rate_t, self.rule
            )  # [B, Hq, q, Dv]
        if self.tc_proj is not None:
            b, hq, q, dv = r.shape
            flat = r.transpose(1, 2).reshape(b, q, hq * dv) @ self.tc_proj.to(r.device).float().T
            r = flat.view(b, q, hq, dv).transpose(1, 2)
        return out + torch.sigmoid(torch.tensor(self.gate)) * r, None

    def _retain(self, logits, visible, lse, step: Step, q_pos, before, ev_k, ev_v, weights, positions, first):
        """After attention: the pool and the pairs that left the window compete for the pool; the losers are written
        into the memory (in place). `lse` is the merged softmax's (window, memory, pool and leaving pairs)."""
        batch = ev_k.shape[0]
        if step.new_real is not None:
            q_real = step.new_real.to(q_pos.device).view(batch, 1)
        else:
            q_real = step.real(q_pos.unsqueeze(0).expand(batch, -1)).to(q_pos.device)
        recording = self.record_past and self.max_rollback
        saved = _map(before, torch.clone) if recording else None
        per_query, visible = self.pool.weights(logits, visible, lse, q_real)
        keys, values, drop, record = self.pool.select(per_query, visible, ev_k, ev_v, positions, weights, q_pos[0])
        self._set_state(self._write(before, keys, values, drop))
        if recording:
            self._journal_add(first, saved, ev_k, ev_v, weights, (record, per_query, visible, int(q_pos[0])))

    # ---- rollback -------------------------------------------------------------------------------------------------
    def _journal_add(self, first, state, keys, values, weights, retained=None) -> None:
        self.journal.append((first, state, keys, values, weights, retained))
        covered = first + keys.shape[-2]
        keep = 0  # the newest entry a crop of max_rollback tokens can still need
        for i, entry in enumerate(self.journal):
            if entry[0] <= covered - self.max_rollback:
                keep = i
        del self.journal[:keep]

    def activate_past_recording(self, **kwargs) -> None:
        """Journal memory writes (and the window's evictions) until the next `crop`, so it can undo them. `kwargs`
        (transformers >= 5.25 passes `recurrent_states_to_keep`) do not apply: the journal is bounded by `max_rollback`.
        """
        self.record_past = True
        self.ring.activate_past_recording()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens: restore the memory from the journal, then the window."""
        if tokens_to_remove > 0 or not self.is_initialized or tokens_to_remove == 0:
            self.journal = []
            return self.ring.crop(tokens_to_remove)
        seen = self.ring.seen
        target = max(0, seen + tokens_to_remove)
        covered, keep = max(0, seen - self.window), max(0, target - self.window)
        if keep < covered:
            entries = [e for e in self.journal if e[0] <= keep]
            if not entries:
                raise RuntimeError(
                    f"Cannot remove {-tokens_to_remove} tokens: their evictions were written into the memory and not "
                    "journaled. Call `cache.activate_past_recording()` before the forward passes you may want to roll "
                    f"back (generate does this for assisted decoding); it keeps max_rollback={self.max_rollback} "
                    "tokens (a cache_config option)."
                )
            first, state, keys, values, weights, retained = entries[-1]
            n = keep - first
            if self.pool is not None:
                self._crop_retained(len(entries) - 1, target, n)
            else:
                self._set_state(self._write(state, keys[:, :, :n], values[:, :, :n], weights[:, :n]) if n else state)
        self.ring.crop(tokens_to_remove)
        self.journal = []

    def _crop_retained(self, index: int, target: int, n: int) -> None:
        """Undo the pool's choices back to journal entry `index`, then redo that forward's as if its queries had
        stopped at position `target` and only its first `n` leaving pairs had left."""
        for entry in reversed(self.journal[index:]):
            self.pool.undo(entry[5][0])
        first, state, keys, values, weights, (_, per_query, visible, q_start) = self.journal[index]
        self._set_state(state)
        if n:
            queries, size = target - q_start, self.pool.size
            per_query, visible = per_query[:, :, :queries, : size + n], visible[:, :queries, : size + n]
            positions = torch.arange(first, first + n, device=keys.device)
            pairs = (keys[:, :, :n], values[:, :, :n], positions, weights[:, :n])
            keys, values, drop, _ = self.pool.select(per_query, visible, *pairs, q_start)
            self._set_state(self._write(state, keys, values, drop))

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.ring._apply_batch(fn)
        self.state = _map(self.state, fn)
        if self.pool is not None:
            self.pool.set_tensors([fn(t) for t in self.pool.tensors()])
        self._mark_static()
        self.journal = [_map_nested(entry, fn) for entry in self.journal]
        self._pending = None

    def reset(self) -> None:
        self.ring.reset()
        self.state, self.journal, self._pending = None, [], None
        if self.pool is not None:
            self.pool.set_tensors([None] * 4)
        self.is_initialized = False

    # ---- sizes ----------------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int | torch.Tensor:
        return self.ring.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.ring.get_mask_sizes(query_length)

    def state_bytes(self) -> int:
        """Bytes of the memory (L2) alone: constant in the sequence length."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.state))

    def memory_bytes(self) -> int:
        """Bytes held by this layer: window, memory and the rollback journals."""
        journal = sum(t.numel() * t.element_size() for t in _nested_tensors(self.journal))
        pool = self.pool.nbytes() if self.pool is not None else 0
        return self.ring.memory_bytes() + self.state_bytes() + pool + journal

    def __repr__(self):
        return (
            f"TensorCacheLayer(window={self.window}, sink_tokens={self.sink_tokens}, mode={self.mode!r}, "
            f"seen={self.ring.seen})"
        )


def _tensors(state) -> list[torch.Tensor]:
    """The tensors of a memory state: `A` (paper) or the fields of a `MomentState` that are set."""
    if state is None:
        return []
    return [state] if isinstance(state, torch.Tensor) else [t for t in state if t is not None]


def _map(state, fn):
    """`fn` applied to every tensor of a memory state, keeping its structure."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    return type(state)(*(fn(t) if t is not None else None for t in state))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _nested_tensors(value) -> list[torch.Tensor]:
    """Every tensor in nested tuples/lists/NamedTuples (`None` and ints skipped)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _nested_tensors(item)]
    return []


def _map_nested(value, fn):
    """`fn` applied to every tensor of nested tuples (NamedTuples keep their type), other items as they are."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [_map_nested(item, fn) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _float_or_none(low: float, high: float, low_open: bool = True):
    def check(value) -> bool:
        if value is None:
            return True
        if isinstance(value, bool):
            return False
        return (low < value if low_open else low <= value) and value <= high

    return check


class TensorCache(NeuralCache):
    """Tensor Cache: per layer and KV head an exact window of the last `window` tokens (plus sinks) and a fixed-size
    memory fed only by the pairs that leave it. Memory is constant in the sequence length.

    Works with any attention implementation the model was loaded with: the attention of this cache's keys is
    routed to the layer, which merges the window with the memory (`attn_implementation="neuralcache"` adds the fused
    Triton kernels on CUDA). With `window` at least the sequence length the memory stays empty and the cache is exact
    (the same outputs as `DynamicCache`).

    Args:
        config (`PreTrainedConfig`): The model's config.
        window (`int`, *optional*, defaults to 256): Most recent positions each query attends to exactly.
        sink_tokens (`int`, *optional*, defaults to 4): First tokens of each sequence that stay visible.
        mode (`str`, *optional*, defaults to `"training_free"`): `"training_free"` (pretrained models), `"learned"`
            (a memory fitted on the frozen model, see `params`) or `"paper"` (the published equations, for models
            trained with them).
        memory (`str`, *optional*): Training-free estimator: `"moment"` (default), `"mean"` or `"gaussian"`.
        rule (`str`, *optional*): Paper write rule: `"delta"` (default) or `"outer"`.
        decay (`float`, *optional*): Decay `lam` in (0, 1] per written pair; defaults to 1.0 (training_free) or 0.995
            (paper, unless `paper_params` has it).
        write_rate (`float`, *optional*): Paper write rate `eta` in (0, 1]; defaults to 0.05.
        gate (`float`, *optional*): Paper gate logit `g`; defaults to -2.0.
        paper_params (`str`, *optional*): Path of a safetensors file with, per layer `i`, `layers.{i}.decay_logit` and
            `layers.{i}.write_logit` (`[Hkv]`), `layers.{i}.gate` (scalar) and optionally `layers.{i}.tc_proj.weight`.
        max_rollback (`int`, *optional*, defaults to 256): Tokens one `crop` can remove while recording the past.
        retain (`int` or `list[int]`, *optional*, defaults to 0): Pairs that left the window kept exactly, per KV head
            (one number for every layer, or one per layer), chosen after every forward by the attention they get
            (TOVA); the others go to the memory. `"training_free"` and `"learned"` modes.
        carry (`float`, *optional*, defaults to 0.0): With `retain`, the share of a retained pair's previous score
            that is kept after `carry_span` queries, in [0, 1): a forward of 64 tokens adds its mean weight to
            `carry` times the previous score; one decoded token keeps `carry ** (1 / 64)` of it and adds its weight
            times `(1 - carry ** (1 / 64)) / (1 - carry)`, so scores fade at the same rate per token however the
            input is split into forwards.
        carry_span (`int`, *optional*, defaults to 64): The number of queries `carry` is given for (>= 1; with
            `carry` only). A fitted `retention` score must have been fitted with chunks of this size.
        params (`str` or `TensorCacheParams`, *optional*): `"learned"` mode only (and required there): the fitted
            memory, or the folder [`TensorCacheParams.save_pretrained`] wrote; a relative path is looked up in the
            model's folder first (`config._name_or_path`). Refused if fitted for another model, window or sinks.
        retention (`str` or `RetentionParams`, *optional*): With `retain`: a fitted retention score
            ([`hf_neuralcache.fit_retention`]), or the folder [`RetentionParams.save_pretrained`] wrote; the pool
            then keeps the candidates it ranks first instead of those with the highest TOVA score. Refused if fitted
            for another model, window or carry.

    Example:

    ```python
    >>> import torch
    >>> import hf_neuralcache
    >>> from hf_neuralcache import CACHE_KWARG  # "cache" (transformers >= 5.24) or "past_key_values"
    >>> from hf_neuralcache.models import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = hf_neuralcache.create_cache("tensor_cache", model.config, window=8, sink_tokens=2)
    >>> out = model(torch.arange(3, 43).unsqueeze(0), **{CACHE_KWARG: cache})
    >>> cache.get_seq_length(), cache.layers[0].ring.capacity, int(cache.layers[0].state.count[0, 0])
    (40, 8, 30)
    ```
    """

    cache_name = "tensor_cache"
    options = {
        "window": Option(int, 256, lambda v: v >= 1, "an int >= 1", "Most recent positions each query sees exactly."),
        "sink_tokens": Option(int, 4, lambda v: v >= 0, "an int >= 0", "First tokens that stay visible."),
        "mode": Option(str, "training_free", lambda v: v in MODES, f"one of {MODES}", "Memory."),
        "memory": Option(
            (str, type(None)), None, lambda v: v is None or v in MEMORIES, f"None or one of {MEMORIES}", "Estimator."
        ),
        "rule": Option(
            (str, type(None)), None, lambda v: v in (None, "delta", "outer"), "None, 'delta' or 'outer'", "Paper rule."
        ),
        "decay": Option((float, int, type(None)), None, _float_or_none(0.0, 1.0), "None or a float in (0, 1]", "lam"),
        "write_rate": Option(
            (float, int, type(None)), None, _float_or_none(0.0, 1.0), "None or a float in (0, 1]", "Paper eta."
        ),
        "gate": Option(
            (float, int, type(None)), None, _float_or_none(-1e9, 1e9), "None or a float", "Paper gate logit."
        ),
        "paper_params": Option((str, type(None)), None, lambda v: True, "None or a safetensors path", "Paper params."),
        "max_rollback": Option(int, 256, lambda v: v >= 0, "an int >= 0", "Tokens a crop can remove (recording)."),
        "params": Option(
            (str, TensorCacheParams, type(None)), None, lambda v: True, "None, a folder or TensorCacheParams", "Fitted."
        ),
        "retain": Option(
            (int, list),
            0,
            lambda v: all(_count(x) for x in (v if isinstance(v, list) else [v])),
            "an int >= 0, or a list with one int >= 0 per layer",
            "Evicted pairs kept exactly per KV head, chosen by attention.",
        ),
        "carry": Option(
            (float, int),
            0.0,
            lambda v: not isinstance(v, bool) and 0.0 <= v < 1.0,
            "a float in [0, 1)",
            "Share of a retained pair's previous score carried.",
        ),
        "carry_span": Option(
            int, 64, lambda v: not isinstance(v, bool) and v >= 1, "an int >= 1", "Queries carry is given for."
        ),
        "retention": Option(
            (str, RetentionParams, type(None)),
            None,
            lambda v: True,
            "None, a folder or RetentionParams",
            "Fitted retention score.",
        ),
    }

    def __init__(
        self,
        config,
        window: int = 256,
        sink_tokens: int = 4,
        mode: str = "training_free",
        memory: str | None = None,
        rule: str | None = None,
        decay: float | None = None,
        write_rate: float | None = None,
        gate: float | None = None,
        paper_params: str | None = None,
        max_rollback: int = 256,
        params: str | TensorCacheParams | None = None,
        retain: int | list[int] = 0,
        carry: float = 0.0,
        retention: str | RetentionParams | None = None,
        carry_span: int = 64,
    ):
        from ..registry import decoder_layer_types

        given = dict(
            window=window,
            sink_tokens=sink_tokens,
            mode=mode,
            memory=memory,
            rule=rule,
            decay=decay,
            write_rate=write_rate,
            gate=gate,
            paper_params=paper_params,
            max_rollback=max_rollback,
            params=params,
            retain=retain,
            carry=carry,
            retention=retention,
            carry_span=carry_span,
        )
        check_options(self.cache_name, self.options, given)
        check_sinks_fit(self.cache_name, window, sink_tokens)
        paper_only = [k for k in ("rule", "write_rate", "gate", "paper_params") if given[k] is not None]
        if mode == "training_free" and paper_only:
            raise ValueError(
                f"cache_config {paper_only} of cache_implementation='tensor_cache' apply to mode='paper' only; "
                "got mode='training_free'. Remove them or set mode='paper'."
            )
        not_learned = [
            k for k in ("memory", "decay", "rule", "write_rate", "gate", "paper_params") if given[k] is not None
        ]
        if mode == "learned" and not_learned:
            raise ValueError(
                f"cache_config {not_learned} of cache_implementation='tensor_cache' do not apply to mode='learned' "
                "(its decay and write rate are fitted, in `params`). Remove them."
            )
        if (mode == "learned") != (params is not None):
            raise ValueError(
                "cache_config['params'] of cache_implementation='tensor_cache' is required with mode='learned' and "
                f"allowed with it only; got mode={mode!r}, params={params!r}. Fit one with "
                "hf_neuralcache.fit_tensor_cache and pass the folder it was saved to."
            )
        if mode == "paper" and memory is not None:
            raise ValueError(
                "cache_config['memory'] of cache_implementation='tensor_cache' applies to mode='training_free' only; "
                "got mode='paper'. Remove it or set mode='training_free'."
            )
        self.window, self.sink_tokens, self.mode = window, sink_tokens, mode
        layer_types = decoder_layer_types(config, self.cache_name)
        retained = [retain] * len(layer_types) if isinstance(retain, int) else list(retain)
        if len(retained) != len(layer_types):
            raise ValueError(
                f"cache_config['retain'] of cache_implementation='tensor_cache' has {len(retained)} items; expected an "
                f"int or one int per layer ({len(layer_types)})."
            )
        if mode == "paper" and any(retained):
            raise ValueError(
                "cache_config['retain'] of cache_implementation='tensor_cache' applies to mode='training_free' or "
                "'learned' (their memory and window share one softmax with the retained pairs); got mode='paper'."
            )
        if carry and not any(retained):
            raise ValueError(
                "cache_config['carry'] of cache_implementation='tensor_cache' applies with 'retain' only; "
                "set retain (retained pairs per KV head) or remove carry."
            )
        if carry_span != self.options["carry_span"].default and not carry:
            raise ValueError(
                "cache_config['carry_span'] of cache_implementation='tensor_cache' is the number of queries 'carry' "
                f"is given for: it applies with carry only; got carry_span={carry_span} and carry={carry}. Set "
                "carry (in (0, 1)) or remove carry_span."
            )
        if retention is not None and not any(retained):
            raise ValueError(
                "cache_config['retention'] of cache_implementation='tensor_cache' ranks retained pairs: it applies "
                "with 'retain' only; set retain or remove retention."
            )
        self.retention = None
        if retention is not None:
            self.retention = _load_params(retention, config, RetentionParams)
            self.retention.check(config=config, window=window, carry=carry)
            if carry and self.retention.chunk != carry_span:
                raise ValueError(
                    f"{self.retention.fit.get('source', 'retention params')} were fitted on scores carried over "
                    f"chunks of {self.retention.chunk} tokens; got carry_span={carry_span}. Use "
                    f"carry_span={self.retention.chunk} or fit again with chunk={carry_span}."
                )
        paper = _load_paper_params(paper_params, len(layer_types)) if paper_params else {}
        self.params = _load_params(params, config, TensorCacheParams) if mode == "learned" else None
        if self.params is not None:
            self.params.check(config=config, window=window, sink_tokens=sink_tokens)
        default_decay = decay if decay is not None else (1.0 if mode == "training_free" else 0.995)
        layers = []
        for i, (layer_type, native_window) in enumerate(layer_types):
            sliding = layer_type == "sliding_attention"
            if sliding and native_window <= window:  # the model's own sliding layers see no farther: no memory
                layers.append(SinkWindowLayer(native_window, 0, is_sliding=True, max_rollback=max_rollback))
                continue
            if self.params is not None and i not in self.params.layer_indices:
                raise ValueError(
                    f"{self.params.fit.get('source', 'tensor_cache params')} have no memory for layer {i}."
                )
            if self.retention is not None and retained[i] and self.retention.layer(i) is None:
                raise ValueError(
                    f"{self.retention.fit.get('source', 'retention params')} have no weights for layer {i}, which "
                    "retains pairs. Fit them for every layer (hf_neuralcache.fit_retention)."
                )
            layer_params = paper.get(i, {})
            layer = TensorCacheLayer(
                window,
                sink_tokens,
                mode=mode,
                memory=memory or "moment",
                rule=rule or "delta",
                decay=layer_params.get("decay", default_decay),
                write_rate=layer_params.get("write_rate", write_rate if write_rate is not None else 0.05),
                gate=layer_params.get("gate", gate if gate is not None else -2.0),
                tc_proj=layer_params.get("tc_proj"),
                max_rollback=max_rollback,
                learned=self.params.layer(i) if self.params is not None else None,
                retain=retained[i],
                carry=float(carry),
                retention=self.retention.layer(i) if self.retention is not None else None,
                carry_span=carry_span,
            )
            layer.is_sliding = sliding
            layers.append(layer)
        super().__init__(layers)
        self.retain = retained
        self.rebuilds_from_kv = not any(retained)  # the pool is chosen by attention: K/V alone cannot rebuild it

    def check_model(self, model) -> None:
        """Refuse a `"learned"` memory or a retention score fitted for another model (weights fingerprint); generate
        calls this."""
        if self.params is not None:
            self.params.check(model=model)
        if self.retention is not None:
            self.retention.check(model=model)

    def memory_bytes_per_layer(self) -> list[int]:
        """Bytes each layer holds now (window, memory and journals)."""
        return [layer.memory_bytes() for layer in self.layers]


def _load_params(params, config, kind):
    """`params` itself if a `kind` (`TensorCacheParams` or `RetentionParams`), else loaded from its folder (a relative
    path is tried in the model's folder first)."""
    import os

    if isinstance(params, kind):
        return params
    model_dir = getattr(config, "_name_or_path", "") or ""
    candidate = os.path.join(model_dir, params) if model_dir and not os.path.isabs(params) else params
    return kind.from_pretrained(candidate if os.path.isdir(candidate) else params)


def _load_paper_params(path: str, n_layers: int) -> dict[int, dict]:
    """Per-layer paper parameters from a safetensors file (see [`TensorCache`] for the names)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    params = {}
    for i in range(n_layers):
        names = [f"layers.{i}.decay_logit", f"layers.{i}.write_logit", f"layers.{i}.gate"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"paper_params {path!r}: expected tensors {names} for every layer, missing {missing}.")
        params[i] = {
            "decay": torch.sigmoid(tensors[names[0]].float()),
            "write_rate": torch.sigmoid(tensors[names[1]].float()),
            "gate": float(tensors[names[2]].float().reshape(-1)[0]),
            "tc_proj": tensors.get(f"layers.{i}.tc_proj.weight"),
        }
    return params
